"""How clients and operators reach the services: Socket.IO namespace ``/chat`` and HTTP."""
