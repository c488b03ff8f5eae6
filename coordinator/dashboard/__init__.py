"""The admin dashboard: static HTML, JS and CSS served by ``coordinator.routes_admin`` at /dashboard."""
