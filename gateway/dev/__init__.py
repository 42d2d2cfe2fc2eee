"""The one-command local stack (`banyan dev`): embedded services, the demo model and seed data."""
