"""mu2net_client: the Python SDK of a mu2net server (no JAX dependency).

    from mu2net_client import Client
    with Client("127.0.0.1:50051", "http://127.0.0.1:8000") as client:
        client.upload("digits", "digits.npz")
        client.wait_until_serving("digits")
        print(client.classify("digits", images, top_k=3)[0].labels)
"""

from mu2net_client.client import AsyncClient, Client
from mu2net_client.errors import (AlreadyExistsError, AuthenticationError, ConflictError, InvalidArgumentError, Mu2netError,
                                  NotFoundError, NotReadyError, OverloadedError, ServerError, TimeoutError, TooLargeError,
                                  TransportError)
from mu2net_client.types import AccuracyPoint, Classification, ClassifyResult, Task

__all__ = ["AsyncClient", "Client", "AlreadyExistsError", "AuthenticationError", "ConflictError", "InvalidArgumentError",
           "Mu2netError", "NotFoundError", "NotReadyError", "OverloadedError", "ServerError", "TimeoutError", "TooLargeError",
           "TransportError", "AccuracyPoint", "Classification", "ClassifyResult", "Task"]
