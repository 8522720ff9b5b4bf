"""medfed on Flower's deployment runtime (SuperLink/SuperNode over TLS, node authentication).

``certs`` makes a test CA, the server's certificate and each site's node-authentication keys;
``processes`` starts and stops SuperLink and SuperNode processes and drives a run from
medfed's own code; ``link`` is the message exchange the coordinator sees inside the
ServerApp; ``flower_app`` is the ServerApp/ClientApp pair; ``coordinator`` and ``site`` are
what runs on either end. Everything but ``certs`` needs the ``deploy`` extra (``flwr``).
"""
