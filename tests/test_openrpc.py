"""``rpc.discover`` is a valid OpenRPC 1.3 document (issue 14, protocol item 7): checked over a
real socket against the published meta-schema (vendored in tests/fixtures), with a result and
the error kinds for every method, and read back into the same catalog the device specs give."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator
from referencing import Registry
from referencing.jsonschema import DRAFT7
from support import ROOT, WAIT

from controller import Client, CommandServer
from controller.devices import add_device
from statemachines import errorkinds as ek
from statemachines.catalog import CommandInfo, catalog_from_discover
from statemachines.device import DeviceSpec, load_device

FIXTURES = ROOT / "tests" / "fixtures"
DEVICES = [ROOT / "config" / "devices" / name for name in ("demo.yaml", "door.yaml")]

#: What the OpenRPC 1.3.2 method object may hold besides ``x-`` extensions.
METHOD_KEYS = {
    "name",
    "description",
    "summary",
    "servers",
    "tags",
    "paramStructure",
    "params",
    "result",
    "errors",
    "links",
    "examples",
    "deprecated",
    "externalDocs",
}


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def openrpc_validator() -> Draft7Validator:
    """The OpenRPC meta-schema, its ``$ref`` to the JSON Schema meta-schema
    (https://meta.json-schema.tools) served from the fixture: no network. The meta-schema's
    ``$schema`` is no draft jsonschema knows, hence the explicit Draft 7."""
    json_schema = DRAFT7.create_resource(_json(FIXTURES / "json-schema-tools-meta-schema.json"))
    registry: Registry[Any] = Registry().with_resources(
        (uri, json_schema)
        for uri in ("https://meta.json-schema.tools", "https://meta.json-schema.tools/")
    )
    return Draft7Validator(_json(FIXTURES / "openrpc-meta-schema.json"), registry=registry)


def problems(doc: Any) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message[:200]}"
        for e in openrpc_validator().iter_errors(doc)
    ]


@pytest.fixture
def served() -> Iterator[tuple[CommandServer, Client, list[DeviceSpec]]]:
    """A server with the demo and door devices and a function command, and a client."""
    server = CommandServer(port=0, grace=0.5)
    specs = [load_device(path) for path in DEVICES]
    for spec in specs:
        add_device(server, spec, simulate=True)

    @server.command("scale", timeout=3)
    def scale(value, factor=2, *more, **options):
        """Multiply a value."""
        return value * factor

    with server, Client(server.address) as client:
        yield server, client, specs


@pytest.fixture
def doc(served: tuple[CommandServer, Client, list[DeviceSpec]]) -> dict[str, Any]:
    _, client, _ = served
    answer = client.call("rpc.discover", timeout=WAIT)
    assert isinstance(answer, dict)
    return answer


def test_discover_validates_against_the_openrpc_meta_schema(doc: dict[str, Any]) -> None:
    assert problems(doc) == []
    assert doc["openrpc"] == "1.3.2"


def test_the_meta_schema_check_has_teeth(doc: dict[str, Any]) -> None:
    # what statelink 1.0 answered: each of these alone fails the document
    calibrate = next(i for i, m in enumerate(doc["methods"]) if m["name"] == "demo.calibrate")
    for path, value in (
        (("devices",), []),
        (("methods", calibrate, "timeout"), 10.0),
        (("methods", calibrate, "params", 0, "schema", "required"), False),
    ):
        bad = json.loads(json.dumps(doc))
        *parents, last = path
        target = bad
        for key in parents:
            target = target[key]
        target[last] = value
        assert problems(bad), path


def test_statelink_additions_are_x_prefixed(doc: dict[str, Any]) -> None:
    assert {k for k in doc if not k.startswith("x-")} == {
        "openrpc",
        "info",
        "methods",
        "components",
    }
    assert [d["name"] for d in doc["x-devices"]] == ["demo", "door"]
    names = [m["name"] for m in doc["methods"]]
    assert names == sorted(names)
    for method in doc["methods"]:
        assert {k for k in method if not k.startswith("x-")} <= METHOD_KEYS, method["name"]
        assert "result" in method and "schema" in method["result"], method["name"]
        for param in method["params"]:
            assert isinstance(param["required"], bool)
            assert "required" not in param["schema"] or isinstance(
                param["schema"]["required"], list
            )
    methods = {m["name"]: m for m in doc["methods"]}
    opening = methods["door.open"]
    assert opening["x-device"] == "door" and opening["x-allowed-states"] == ["closed"]
    assert (opening["x-running"], opening["x-to"], opening["x-cancelled"]) == (
        "opening",
        "open",
        "ajar",
    )
    assert opening["x-timeout"] == 30
    assert opening["x-idempotency-key"] is True and "x-idempotency-key" not in methods["scale"]
    assert "x-idempotency-key" not in methods["door.state"]
    assert set(doc["x-notifications"]) == {"device.state", "rpc.progress"}
    assert methods["scale"]["x-timeout"] == 3 and "x-device" not in methods["scale"]


def test_every_error_kind_is_listed_and_each_method_refers_to_them(doc: dict[str, Any]) -> None:
    errors = doc["components"]["errors"]
    on_the_wire = set(ek.KIND_BY_CODE.values()) - {"connection_lost", "offline"}  # client side
    assert set(errors) == on_the_wire
    for kind, error in errors.items():
        assert ek.kind_of(error["code"]) == kind and error["message"]
    methods = {m["name"]: m for m in doc["methods"]}
    for method in methods.values():
        refs = [e["$ref"] for e in method["errors"]]
        assert refs and all(r.removeprefix("#/components/errors/") in errors for r in refs)

    def kinds(name: str) -> set[str]:
        return {e["$ref"].rsplit("/", 1)[1] for e in methods[name]["errors"]}

    assert {"not_allowed", "device_fault", "key_conflict", "interrupted"} <= kinds("demo.reset")
    assert "not_allowed" not in kinds("scale") and "timeout" in kinds("scale")
    assert kinds("rpc.cancel") == {"invalid_params", "busy", "unauthorized"}


def test_builtin_params_are_declared(doc: dict[str, Any]) -> None:
    methods = {m["name"]: m for m in doc["methods"]}

    def params(name: str) -> list[tuple[str, bool]]:
        return [(p["name"], p["required"]) for p in methods[name]["params"]]

    assert params("rpc.cancel") == [("id", True)]
    assert params("rpc.subscribe") == params("rpc.unsubscribe") == [("method", True)]
    assert params("rpc.hello") == [
        ("client", False),
        ("protocol", False),
        ("nonce", False),
        ("response", False),
        ("callback_port", False),
    ]
    for name in ("rpc.ping", "rpc.stats", "rpc.discover", "demo.state"):
        assert params(name) == []


def test_the_results_fit_their_declared_schemas(
    served: tuple[CommandServer, Client, list[DeviceSpec]], doc: dict[str, Any]
) -> None:
    _, client, _ = served
    results = {m["name"]: m["result"]["schema"] for m in doc["methods"]}
    for method, params in (
        ("rpc.ping", None),
        ("rpc.hello", {"client": "pytest"}),
        ("rpc.stats", None),
        ("rpc.subscribe", {"method": "device.state"}),
        ("rpc.unsubscribe", {"method": "device.state"}),
        ("rpc.cancel", {"id": "no such request"}),
        ("rpc.discover", None),
        ("demo.state", None),
        ("door.state", None),
        ("demo.read_button", None),
        ("scale", [2]),
    ):
        answer = client.call(method, params, timeout=WAIT)
        found = [e.message for e in Draft7Validator(results[method]).iter_errors(answer)]
        assert found == [], (method, answer)
    state = results["door.state"]
    assert state["properties"]["state"]["enum"] == list(load_device(DEVICES[1]).states)
    assert list(Draft7Validator(state).iter_errors({"device": "door", "state": "nowhere"}))


def test_catalog_from_discover_gives_back_the_specs_infos(
    served: tuple[CommandServer, Client, list[DeviceSpec]], doc: dict[str, Any]
) -> None:
    _, _, specs = served
    expected: dict[str, CommandInfo] = {}
    for spec in specs:
        expected.update(spec.catalog())
    expected["scale"] = CommandInfo.plain(
        "scale",
        {"value": {"required": True}, "factor": {"required": False}},
        timeout=3,
        description="Multiply a value.",
    )
    catalog = catalog_from_discover(json.loads(json.dumps(doc)))
    assert catalog == expected
    assert catalog["door.open"].cancelled == "ajar"


def test_an_info_survives_its_method_object() -> None:
    spec = load_device(DEVICES[0])
    for info in spec.command_infos():
        method = json.loads(json.dumps(info.to_openrpc()))
        assert CommandInfo.from_json(method, states=spec.states) == info
