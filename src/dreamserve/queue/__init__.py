"""The queue tier: the tasks table and its migrations, named transitions, leases, the event hubs, the server key."""
