"""TLS through pipeguard.rpc, in-process: a real server on port 0 with certificates made here."""

from __future__ import annotations

import asyncio
import enum

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pipeguard import config as pgconfig
from pipeguard.config import ConfigError, NetConfig
from pipeguard.rpc import blocking_channel, channel, start_server
from node.config import NodeConfig
from tests.pki import CA

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(60)]

SERVICE = "pipeguard.v1.Node"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, rogue = CA(), CA("rogue CA")
    return {"server": ca.write(d / "server", "server"), "client": ca.write(d / "client", "client"),
            "rogue": rogue.write(d / "rogue", "rogue")}


def server_net(files, mutual: bool) -> NetConfig:
    return NetConfig(bind="127.0.0.1:0", tls_cert=str(files.cert), tls_key=str(files.key), tls_ca=str(files.ca),
                     tls_require_client_cert=mutual)


async def check(address: str, net: NetConfig | None) -> grpc.StatusCode:
    """Health-check ``address`` through a channel made by pipeguard.rpc (or a plaintext one)."""
    ch = channel(address, net) if net is not None else grpc.aio.insecure_channel(address)
    try:
        reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        return grpc.StatusCode.OK
    except grpc.aio.AioRpcError as err:
        return err.code()
    finally:
        await ch.close()


class Client(enum.Enum):
    """Who calls a TLS server, and with what."""

    PLAINTEXT = "plaintext"
    TLS_NO_CERT = "tls-no-cert"
    TLS_CLIENT_CERT = "tls-client-cert"
    ROGUE_CLIENT_CERT = "rogue-client-cert"
    TRUSTS_ROGUE_CA = "trusts-rogue-ca"


def client_net(pki, who: Client) -> NetConfig | None:
    ca, client, rogue = str(pki["server"].ca), pki["client"], pki["rogue"]
    return {
        Client.PLAINTEXT: None,
        Client.TLS_NO_CERT: NetConfig(tls_ca=ca),
        Client.TLS_CLIENT_CERT: NetConfig(tls_ca=ca, tls_cert=str(client.cert), tls_key=str(client.key)),
        Client.ROGUE_CLIENT_CERT: NetConfig(tls_ca=ca, tls_cert=str(rogue.cert), tls_key=str(rogue.key)),
        Client.TRUSTS_ROGUE_CA: NetConfig(tls_ca=str(rogue.ca), tls_cert=str(client.cert), tls_key=str(client.key)),
    }[who]


OK, REFUSED = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("mutual,who,expected", [
    (False, Client.PLAINTEXT, REFUSED),
    (False, Client.TLS_NO_CERT, OK),
    (False, Client.TRUSTS_ROGUE_CA, REFUSED),  # the client does not trust the server's certificate
    (True, Client.PLAINTEXT, REFUSED),
    (True, Client.TLS_NO_CERT, REFUSED),
    (True, Client.ROGUE_CLIENT_CERT, REFUSED),
    (True, Client.TRUSTS_ROGUE_CA, REFUSED),
    (True, Client.TLS_CLIENT_CERT, OK),
], ids=lambda v: v.value if isinstance(v, Client) else str(v))
def test_tls_server_accepts_only_clients_it_should(pki, mutual, who, expected):
    async def scenario():
        server, address, _ = await start_server(server_net(pki["server"], mutual), lambda s: None, [SERVICE])
        try:
            assert await check(address, client_net(pki, who)) == expected
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_blocking_channel_speaks_tls_too(pki):
    async def scenario():
        server, address, _ = await start_server(server_net(pki["server"], True), lambda s: None, [SERVICE])
        try:
            def call(net):
                with blocking_channel(address, net) as ch:
                    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status

            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, call, client_net(pki, Client.TLS_CLIENT_CERT)) == \
                health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:
                await loop.run_in_executor(None, call, NetConfig())
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await server.stop(None)

    asyncio.run(scenario())


def test_tls_settings_are_checked_and_say_how_to_fix_them(pki, tmp_path):
    files = pki["server"]
    with pytest.raises(ConfigError, match="tls_cert and net.tls_key go together"):
        NetConfig(tls_cert=str(files.cert))
    with pytest.raises(ConfigError, match="no such file"):
        NetConfig(tls_ca=str(tmp_path / "missing.pem"))
    with pytest.raises(ConfigError, match="tls_require_client_cert needs"):
        NetConfig(tls_cert=str(files.cert), tls_key=str(files.key), tls_require_client_cert=True)
    assert not NetConfig().tls and NetConfig(tls_ca=str(files.ca)).tls


def test_tls_comes_from_toml_environment_and_flags(pki, tmp_path):
    files = pki["server"]
    toml = tmp_path / "node.toml"
    toml.write_text(f'[net]\ntls_cert = "{files.cert}"\ntls_key = "{files.key}"\n')
    cfg = pgconfig.load(NodeConfig, path=toml, environ={"PIPEGUARD_NET_TLS_CA": str(files.ca),
                                                        "PIPEGUARD_NET_TLS_REQUIRE_CLIENT_CERT": "true"})
    assert (cfg.net.tls_cert, cfg.net.tls_key, cfg.net.tls_ca) == (str(files.cert), str(files.key), str(files.ca))
    assert cfg.net.tls_require_client_cert

    from node.daemon import load_config, parse_args

    args = parse_args(["--tls-cert", str(files.cert), "--tls-key", str(files.key), "--tls-ca", str(files.ca),
                       "--tls-require-client-cert", "--metrics-port", "9100"])
    cfg = load_config(args)
    assert cfg.net.tls_require_client_cert and cfg.net.tls_ca == str(files.ca) and cfg.net.metrics_port == 9100
