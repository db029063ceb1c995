"""The websocket <-> ZMQ bridge: `codec` turns frames into message parts and back (pure
functions), `session` keeps one client's channel sockets, `connection` pumps a websocket."""
