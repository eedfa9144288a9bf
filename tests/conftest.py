pytest_plugins = ["tests.hub_fixtures"]
