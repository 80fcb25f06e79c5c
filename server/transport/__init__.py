"""Socket.IO transport of the chat server."""
