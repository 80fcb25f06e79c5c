"""Everything that makes many instances behave as one: Socket.IO managers, Redis, registry."""
