"""The web face: thin handlers, each module ending with its route table."""
