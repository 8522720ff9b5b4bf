"""What the Flower agreement tests share: a stand-in client identity for ``aggregate_fit``."""

from flwr.server.client_proxy import ClientProxy


class FlowerProxy(ClientProxy):
    """Only an identity: ``aggregate_fit`` carries it along and never calls a client."""

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError
