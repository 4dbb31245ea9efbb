"""A local S3 server for tests: moto in server mode, on 127.0.0.1 only.

Use it from a test module with `pytest_plugins = ["s3_server"]` (pytest puts
tests/ on sys.path, as for `standins`). `s3_server` (session) starts
one server, creates a bucket and points the AWS environment at it (dummy
credentials, region us-east-1, AWS_ENDPOINT_URL); `s3_uri` is a fresh
`s3://bucket/<prefix>` per test. Child processes started by a test (spawn)
inherit the environment, so they reach the same server.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass

import pytest

BUCKET = "evolve-test"


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>
    bucket: str

    @property
    def base(self) -> str:
        return f"s3://{self.bucket}"

    def client(self):
        """A boto3 client of the server (for what pyarrow has no call for)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a log line per request
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups (off the network)
        "NO_PROXY": "127.0.0.1,localhost",
    }
    saved = {k: os.environ.get(k) for k in (*env, "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN")}
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.update(env)
    info = S3Server(endpoint=env["AWS_ENDPOINT_URL"], bucket=BUCKET)
    try:
        info.client().create_bucket(Bucket=BUCKET)
        yield info
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture
def s3_uri(s3_server) -> str:
    """A fresh prefix of the test bucket, `s3://evolve-test/<test>-<random>`."""
    return f"{s3_server.base}/t-{uuid.uuid4().hex[:10]}"
