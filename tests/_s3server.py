"""A real S3 endpoint on loopback for tests: moto's server mode, with the real clients."""

from __future__ import annotations

import socket
import urllib.request
from contextlib import contextmanager

import pytest

BUCKET = "fpstore-test"


@contextmanager
def s3_server(monkeypatch):
    """Start moto's S3 server on 127.0.0.1, point the AWS clients at it, stop it at the end.

    Yields the bucket's URL prefix (``s3://fpstore-test``). Skips when moto is not installed.
    """
    server_module = pytest.importorskip("moto.server", reason="moto[server] is in the test extra")
    boto3 = pytest.importorskip("boto3")
    with socket.socket() as probe:  # a free loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        # s3fs (aiobotocore), boto3 and pyarrow's S3 client all read these.
        for name, value in {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        # moto keeps its buckets in the process, across servers: start from an empty one.
        urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"),
            timeout=30,
        ).close()
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}"
    finally:
        server.stop()
