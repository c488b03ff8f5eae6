"""``hilora bench``: HiLoRA against federated-LoRA baselines and its own ablations, run by the service.

Every method is a federation configuration (``methods``) that the real coordinator and worker code
run (``engine``: in this process through Starlette's TestClient, or as processes over loopback HTTP);
the numbers are read back from the service's own report and views (``report``, ``plots``). What the
methods share for one seed (partition, data, backbone, manifest) is built once (``setup``).

    root rounds -> [probe round -> clustering -> cluster rounds -> leaf rounds] -> final evaluation
    -> unseen clients (probe, assignment, zero-shot, leaf rounds)

Budgets are equal: hilora splits the rounds root / cluster / leaf, flat baselines run them all on
their global adapter; every method trains the same local epochs per round from the same seeded
initial root, on the same data and backbone.
"""

from hilora.bench.engine import (
    HttpService,
    InProcessService,
    open_service,
    round_curve,
    run_bench,
    run_method,
)
from hilora.bench.methods import (
    ABLATIONS,
    BASELINES,
    METHOD_SUMMARIES,
    METHODS,
    REFERENCES,
    MethodConfig,
    default_methods,
    method_config,
    parse_methods,
    parse_rounds,
    planted_assignment,
    preset,
)
from hilora.bench.report import accuracy_stats, format_table, majority_clusters, summarize, write_outputs
from hilora.bench.setup import (
    PAPER_MODEL,
    PAPER_PARTITIONS,
    PAPER_RANK,
    BenchSetup,
    ClientDataCache,
    bench_backbone,
    check_client_data,
    check_partition,
    check_partition_data,
    paper_partition,
    partition_num_classes,
    prepare,
)

__all__ = [
    "ABLATIONS", "BASELINES", "METHODS", "REFERENCES", "planted_assignment", "METHOD_SUMMARIES", "PAPER_MODEL", "PAPER_PARTITIONS", "PAPER_RANK",
    "BenchSetup", "ClientDataCache", "HttpService", "InProcessService", "MethodConfig", "accuracy_stats",
    "bench_backbone", "check_client_data", "check_partition", "check_partition_data",
    "default_methods", "format_table", "majority_clusters", "method_config", "open_service", "paper_partition",
    "parse_methods", "parse_rounds", "partition_num_classes", "prepare", "preset", "round_curve", "run_bench",
    "run_method", "summarize", "write_outputs",
]
