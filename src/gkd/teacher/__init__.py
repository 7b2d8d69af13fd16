"""Teachers: the Teacher protocol (base), a model in this process (local), a server over HTTP (remote,
wire) and the server gkd runs itself (serve)."""
