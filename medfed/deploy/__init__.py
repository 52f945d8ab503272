"""Deployment on Flower's deployment runtime: provisioning kits, starting the SuperLink and the
SuperNodes with TLS and SuperNode authentication, and submitting runs to them."""
