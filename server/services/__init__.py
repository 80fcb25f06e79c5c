"""Chat services: rooms, messages, presence, figures. They know no Socket.IO and no Redis;
they reach out through the protocols in ``ports``."""
