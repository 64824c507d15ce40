"""TLS and node-identity material for a federation, made with ``cryptography``.

Layout of a certificate folder::

    ca.crt  ca.key              the federation's CA (keep ca.key off the coordinator in production)
    server.crt  server.key      the coordinator's TLS certificate (SuperLink, aggregation server)
    coordinator.crt/.key        the coordinator's TLS client certificate (CN "coordinator") for the
                                aggregation server: opening rounds and publishing versions need it
    nodes/<name>/node.key       a data holder's SuperNode identity (ECDSA P-384, OpenSSH format)
    nodes/<name>/node.pub       its public half, registered with the SuperLink
    nodes/<name>/client.crt/.key  its TLS client certificate (mutual TLS with the aggregation server)
    nodes/<name>/peers/node.<other>.pub  every node's public identity key (rewritten when nodes are added): the
                                roster against which the holder checks its neighbours in a secure round

Private keys are written with mode 0600 and never overwritten: running the command again adds the nodes
that are missing and leaves everything else as it is.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedprompt.errors import FedPromptError

VALID_DAYS = 365
COORDINATOR_CN = "coordinator"
NODE_CN_PREFIX = "node:"
NODE_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-")


@dataclass(frozen=True)
class NodeFiles:
    name: str
    private_key: Path
    public_key: Path
    client_cert: Path
    client_key: Path


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    pkcs8 = serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedprompt")
    return x509.Name([org, x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    return cert, key


def _make_ca(folder: Path, days: int) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("fedprompt federation CA")
    cert = (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # keyCertSign, cRLSign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(folder / "ca.key", _pem_key(key), secret=True)
    _write(folder / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), secret=False)


def _issue(folder: Path, stem: Path, cn: str, *, server_hosts: list[str] | None, days: int) -> None:
    ca_cert, ca_key = _load_ca(folder)
    key = ec.generate_private_key(ec.SECP384R1())
    builder = (
        _builder(_name(cn), ca_cert.subject, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
    )
    if server_hosts is not None:
        sans: list[x509.GeneralName] = []
        for h in server_hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA384())
    _write(stem.with_suffix(".key"), _pem_key(key), secret=True)
    _write(stem.with_suffix(".crt"), cert.public_bytes(serialization.Encoding.PEM), secret=False)


def node_files(folder: str | Path, name: str) -> NodeFiles:
    d = Path(folder) / "nodes" / name
    return NodeFiles(name, d / "node.key", d / "node.pub", d / "client.crt", d / "client.key")


def _make_node(folder: Path, name: str, days: int) -> NodeFiles:
    files = node_files(folder, name)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(files.private_key, private, secret=True)
    _write(files.public_key, public + f" fedprompt-{name}\n".encode(), secret=False)
    _issue(folder, files.client_cert.with_suffix(""), f"{NODE_CN_PREFIX}{name}", server_hosts=None, days=days)
    return files


def check_node_name(name: str) -> None:
    if not name or not set(name) <= NODE_NAME_CHARS or name.startswith("-"):
        raise FedPromptError(f"node name {name!r}: use lowercase letters, digits and '-' (it names files and pods)")


def create(folder: str | Path, *, nodes: list[str], hosts: list[str], days: int = VALID_DAYS) -> dict[str, list[str]]:
    """Create what is missing in ``folder``; returns the files created and the ones kept."""
    folder = Path(folder)
    for n in nodes:
        check_node_name(n)
    if len(set(nodes)) != len(nodes):
        raise FedPromptError(f"node names repeat: {nodes}")
    # the coordinator's own tools reach it over loopback, whatever names it is known by outside
    hosts = list(dict.fromkeys([*hosts, "localhost", "127.0.0.1"]))
    made, kept = [], []
    if (folder / "ca.crt").exists() != (folder / "ca.key").exists():
        raise FedPromptError(f"{folder}: ca.crt and ca.key must both exist or both be absent")
    if not (folder / "ca.crt").exists():
        _make_ca(folder, days)
        made += ["ca.crt", "ca.key"]
    else:
        kept.append("ca.crt")
    if not (folder / "server.crt").exists():
        _issue(folder, folder / "server", "fedprompt coordinator", server_hosts=hosts, days=days)
        made += ["server.crt", "server.key"]
    else:
        kept.append("server.crt")
    if not (folder / "coordinator.crt").exists():
        _issue(folder, folder / "coordinator", COORDINATOR_CN, server_hosts=None, days=days)
        made += ["coordinator.crt", "coordinator.key"]
    else:
        kept.append("coordinator.crt")
    for n in nodes:
        if node_files(folder, n).private_key.exists():
            kept.append(f"nodes/{n}")
        else:
            _make_node(folder, n, days)
            made.append(f"nodes/{n}")
    write_rosters(folder)
    return {"created": made, "kept": kept}


def write_rosters(folder: str | Path) -> None:
    """Give every node folder the public identity keys of all nodes (``peers/node.NAME.pub``): a holder verifies
    its neighbours' signed SecAgg keys against this copy, handed to it with its own files, never against keys
    the aggregation server supplies. A node added later is unknown to holders until they get the new roster."""
    folder = Path(folder)
    keys = {n: p.read_bytes() for n, p in node_public_keys(folder).items()}
    for name in keys:
        peers = folder / "nodes" / name / "peers"
        if not (folder / "nodes" / name).is_dir():
            continue  # a flat node.NAME.pub only: no folder to hand out
        for other, pub in keys.items():
            _write(peers / f"node.{other}.pub", pub, secret=False)
        for stale in peers.glob("node.*.pub"):
            if stale.name[len("node.") : -len(".pub")] not in keys:
                stale.unlink()


def fingerprint(public_key: Path) -> str:
    """``SHA256:...`` of an OpenSSH public key file, as ``ssh-keygen -lf`` prints it: for comparing rosters."""
    import base64
    import hashlib

    blob = base64.b64decode(public_key.read_text().split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def node_public_keys(folder: str | Path) -> dict[str, Path]:
    """Every registered node's public key: ``nodes/NAME/node.pub``, or ``node.NAME.pub`` beside ca.crt (the
    flat layout of a Kubernetes Secret mounted as the certificate folder; see ``write_bundles``)."""
    folder = Path(folder)
    keys: dict[str, Path] = {}
    for p in sorted(folder.glob("node.*.pub")):
        name = p.name[len("node.") : -len(".pub")]
        if name and set(name) <= NODE_NAME_CHARS:
            keys[name] = p
    d = folder / "nodes"
    if d.exists():
        keys.update({p.name: p / "node.pub" for p in sorted(d.iterdir()) if (p / "node.pub").exists()})
    return dict(sorted(keys.items()))


def registered_nodes(folder: str | Path) -> list[NodeFiles]:
    out = []
    for name, pub in node_public_keys(folder).items():
        files = node_files(folder, name)
        out.append(NodeFiles(name, files.private_key, pub, files.client_cert, files.client_key))
    return out


COORDINATOR_FILES = ("ca.crt", "server.crt", "server.key", "coordinator.crt", "coordinator.key")
HOLDER_FILES = {"ca.crt": None, "node.key": "private_key", "client.crt": "client_cert", "client.key": "client_key"}


def write_bundles(folder: str | Path, out: str | Path, *, nodes: list[str], kustomize: bool = False) -> list[Path]:
    """Copy the material into what each party is given, one folder per party (the containers mount these):

    out/coordinator/   ca.crt, server.crt/.key, coordinator.crt/.key and node.NAME.pub of every registered node
                       (the coordinator side's certificate folder; never ca.key)
    out/nodes/NAME/    ca.crt, node.key, client.crt/.key (one data holder's own) and node.OTHER.pub of every node
                       (its roster of peers' identity keys)

    With ``kustomize`` each folder also gets the kustomization of its Secret (fedprompt-coordinator-certs,
    fedprompt-node-NAME), which the Kubernetes overlays include. Private keys are written 0600, owned by whoever
    runs this: a container that reads them must run as that user (the images' UID 10001 when made from one).
    ``out`` should stay out of version control.
    """
    folder, out = Path(folder), Path(out)
    written: list[Path] = []

    def put(dst: Path, src: Path) -> None:
        _write(dst, src.read_bytes(), secret=src.suffix == ".key")
        written.append(dst)

    def kustomization(dst: Path, secret: str, files: list[str]) -> None:
        if not kustomize:
            return
        lines = [
            "# written by `fedprompt certs --kustomize`: do not commit this folder",
            "apiVersion: kustomize.config.k8s.io/v1beta1",
            "kind: Kustomization",
            "secretGenerator:",
            f"  - name: {secret}",
            "    files:",
            *[f"      - {f}" for f in files],
        ]
        _write(dst / "kustomization.yaml", ("\n".join(lines) + "\n").encode(), secret=False)
        written.append(dst / "kustomization.yaml")

    coord = out / "coordinator"
    for name in COORDINATOR_FILES:
        put(coord / name, folder / name)
    keys = node_public_keys(folder)
    for name, pub in keys.items():
        put(coord / f"node.{name}.pub", pub)
    kustomization(coord, "fedprompt-coordinator-certs", [*COORDINATOR_FILES, *(f"node.{n}.pub" for n in keys)])
    for name in nodes:
        files = node_files(folder, name)
        dst = out / "nodes" / name
        for fname, attr in HOLDER_FILES.items():
            put(dst / fname, folder / "ca.crt" if attr is None else getattr(files, attr))
        for other, pub in keys.items():
            put(dst / f"node.{other}.pub", pub)
        kustomization(dst, f"fedprompt-node-{name}", [*HOLDER_FILES, *(f"node.{n}.pub" for n in keys)])
    return written
