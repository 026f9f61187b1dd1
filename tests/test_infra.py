"""infra/ stays true to the code: the files parse, name modules, presets and commands that
exist, agree on ports, use only metric names ops/ exports, the Ray cluster configs validate
against Ray's own schema, and the KubeRay manifests carry the fields the KubeRay CRDs
require. Also the shared input checks of cluster/presets.py (wrong preset, wrong run
directory) and the `moeyard` command's use of them."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster import presets
from cluster.cli import COMMANDS
from cluster.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
RUNBOOKS = ROOT / "runbooks"

# The one set of ports (documented in runbooks/README.md and the headers of the files).
PORTS = {
    "ray_gcs": 6379,
    "ray_dashboard": 8265,
    "ray_metrics_export": 8080,
    "ray_client": 10001,
    "dcgm_exporter": 9400,
    "prometheus": 9090,
    "grafana": 3000,
}
RAY_CONFIGS = sorted((INFRA / "ray").glob("*.yaml"))
K8S_FILES = sorted((INFRA / "k8s").glob("*.yaml"))


def _yaml_docs(path: Path) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _infra_files() -> list[Path]:
    return sorted(
        p for p in INFRA.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".json")
    )


def test_every_yaml_and_json_file_parses() -> None:
    files = _infra_files()
    assert len(files) >= 15, files  # runs, ray, k8s, prometheus, grafana
    for path in files:
        if path.suffix == ".json":
            with open(path, encoding="utf-8") as f:
                assert isinstance(json.load(f), dict), path
        else:
            assert _yaml_docs(path), f"{path} is empty"


# ---- names: modules, presets, commands, files --------------------------------------------


def _texts() -> dict[Path, str]:
    files = [
        *RAY_CONFIGS,
        *K8S_FILES,
        INFRA / "k8s" / "Dockerfile",
        *(INFRA / "prometheus").glob("*.yml"),
        *RUNBOOKS.glob("*.md"),
    ]
    return {p: p.read_text(encoding="utf-8") for p in files}


_DIRS = "infra|runbooks|ops|cluster|trainer|dataloader|tests"


def names_in(text: str) -> dict[str, set[str]]:
    """Modules (`python -m X`), presets and repository files, and `moeyard` subcommands
    named in a text."""
    return {
        "modules": set(re.findall(r"python3? -m ([A-Za-z_][\w.]*)", text)),
        "files": set(re.findall(rf"\b((?:{_DIRS})/[\w./-]*\w\.(?:yaml|yml|json|md|py))\b", text)),
        "commands": set(re.findall(r"(?:^|[\s(;&|])moeyard ([a-z][a-z-]*)\b", code_in(text), re.M)),
    }


def code_in(text: str) -> str:
    """The command-like parts of a text: fenced blocks, `inline code`, and comment lines
    indented as examples (`#   ray up ...`)."""
    fenced = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.M | re.S)
    inline = re.findall(r"`([^`\n]+)`", text)
    examples = re.findall(r"^\s*#\s{2,}(\S.*)$", text, re.M)
    return "\n".join([*fenced, *inline, *examples])


def test_names_in_catches_a_wrong_name() -> None:
    found = names_in("run `python -m cluster.lunch infra/runs/nope.yaml` then `moeyard frob x`")
    assert found == {
        "modules": {"cluster.lunch"},
        "files": {"infra/runs/nope.yaml"},
        "commands": {"frob"},
    }


# Third-party modules a runbook may run with `python -m`.
EXTERNAL_MODULES = {"pip", "venv", "json.tool", "http.server"}


def test_every_module_preset_file_and_command_named_exists() -> None:
    seen: dict[str, set[str]] = {"modules": set(), "files": set(), "commands": set()}
    for path, text in _texts().items():
        found = names_in(text)
        for kind, names in found.items():
            seen[kind] |= names
        for module in found["modules"] - EXTERNAL_MODULES:
            assert importlib.util.find_spec(module) is not None, f"{path}: no module {module}"
        for name in found["files"]:
            assert (ROOT / name).exists(), f"{path} names {name}, which does not exist"
        for cmd in found["commands"]:
            assert cmd in COMMANDS, f"{path}: `moeyard {cmd}` is not a command ({sorted(COMMANDS)})"
    # The check saw what the files are about (a broken regex would pass vacuously).
    assert {"cluster.launch"} <= seen["modules"]
    assert {"infra/runs/tiny.yaml", "infra/runs/deepseek-v2-lite-h200-1x8.yaml"} <= seen["files"]
    assert {"prepare", "export", "report"} <= seen["commands"]


# ---- Ray cluster launcher configs --------------------------------------------------------


def _ray_version_pins(text: str) -> set[str]:
    return set(re.findall(r"ray\[[\w,]+\]==([\d.]+)", text))


@pytest.mark.parametrize("path", RAY_CONFIGS, ids=lambda p: p.name)
def test_ray_cluster_config_validates_against_rays_schema(path: Path) -> None:
    import jsonschema
    import ray.autoscaler

    (cfg,) = _yaml_docs(path)
    # Ray's own schema for `ray up` configs: an unknown or missing field fails.
    with open(Path(ray.autoscaler.__file__).parent / "ray-schema.json") as f:
        jsonschema.validate(cfg, json.load(f))
    assert cfg["head_node_type"] in cfg["available_node_types"]
    head = " ".join(cfg["head_start_ray_commands"])
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert f"--port={PORTS['ray_gcs']}" in head
    assert f"--dashboard-port={PORTS['ray_dashboard']}" in head
    assert "--dashboard-host=0.0.0.0" in head
    for cmds in (head, worker):
        assert f"--metrics-export-port={PORTS['ray_metrics_export']}" in cmds
    assert f"$RAY_HEAD_IP:{PORTS['ray_gcs']}" in worker
    setup = " ".join(cfg["setup_commands"])
    assert "pip install -q -e ~/moeyard" in setup and cfg["file_mounts"]["~/moeyard"] == "."


def test_gpu_cluster_has_8_gpu_h100_and_h200_worker_types() -> None:
    (cfg,) = _yaml_docs(INFRA / "ray" / "gpu-aws.yaml")
    types = {t["node_config"]["InstanceType"] for t in cfg["available_node_types"].values()}
    assert {"p5.48xlarge", "p5e.48xlarge"} <= types  # 8 x H100, 8 x H200
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no training worker on the head
    assert "dcgm-exporter --address :" + str(PORTS["dcgm_exporter"]) in " ".join(
        cfg["worker_setup_commands"]
    )


def test_one_ray_version_everywhere_within_the_project_range() -> None:
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    pins: set[str] = set()
    for path in RAY_CONFIGS:
        pins |= _ray_version_pins(path.read_text())
    for path in K8S_FILES:
        for doc in _yaml_docs(path):
            spec = doc.get("spec", {})
            for cluster in (spec, spec.get("rayClusterSpec") or {}):
                if "rayVersion" in cluster:
                    pins.add(cluster["rayVersion"])
    docker = (INFRA / "k8s" / "Dockerfile").read_text()
    pins |= set(re.findall(r"FROM rayproject/ray:([\d.]+)-", docker))
    assert len(pins) == 1, f"Ray versions disagree across infra/: {pins}"
    (pin,) = pins
    # The project's own requirement, as installed from pyproject.toml.
    deps = [Requirement(d) for d in requires("moeyard") or []]
    ray_req = next(d for d in deps if d.name == "ray")
    assert ray_req.specifier.contains(pin), f"infra pins ray {pin}, pyproject wants {ray_req}"


# ---- KubeRay manifests -------------------------------------------------------------------

# Required fields of the ray.io/v1 CRDs of KubeRay v1.3 (from the operator's Go types,
# ray-operator/apis/ray/v1/raycluster_types.go and rayjob_types.go: fields without
# `omitempty`/`+optional`). rayStartParams is required there (later versions relaxed it;
# keeping it satisfies both). Kubernetes' own: a pod spec needs containers, a container a name.
KUBERAY_VERSION = "v1.3"
REQUIRED = {
    "RayClusterSpec": ["headGroupSpec"],
    "HeadGroupSpec": ["rayStartParams", "template"],
    "WorkerGroupSpec": ["groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"],
    "RayJobSpec": [],  # every field optional; moeyard's RayJob sets entrypoint + rayClusterSpec
    "DeletionPolicy": ["policy"],
    "PodSpec": ["containers"],
    "Container": ["name"],
}


def _require(obj: dict[str, Any], kind: str, where: str) -> None:
    missing = [k for k in REQUIRED[kind] if k not in obj]
    assert not missing, f"{where}: {kind} lacks required {missing} (KubeRay {KUBERAY_VERSION})"


def _check_pod(template: dict[str, Any], where: str) -> list[dict[str, Any]]:
    spec = template.get("spec") or {}
    _require(spec, "PodSpec", f"{where}.template.spec")
    for i, c in enumerate(spec["containers"]):
        _require(c, "Container", f"{where}.template.spec.containers[{i}]")
    return spec["containers"]


def check_ray_cluster_spec(spec: dict[str, Any], where: str) -> dict[str, Any]:
    """Checks a RayClusterSpec; returns {"head": [containers], "workers": [(group, containers)]}."""
    _require(spec, "RayClusterSpec", where)
    head = spec["headGroupSpec"]
    _require(head, "HeadGroupSpec", f"{where}.headGroupSpec")
    out: dict[str, Any] = {
        "head": _check_pod(head["template"], f"{where}.headGroupSpec"),
        "head_params": head["rayStartParams"],
        "workers": [],
    }
    for i, g in enumerate(spec.get("workerGroupSpecs", [])):
        w = f"{where}.workerGroupSpecs[{i}]"
        _require(g, "WorkerGroupSpec", w)
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"], w
        out["workers"].append((g, _check_pod(g["template"], w)))
    return out


def _cluster_specs() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    specs = []
    for path in K8S_FILES:
        for doc in _yaml_docs(path):
            if doc.get("apiVersion") != "ray.io/v1":
                continue
            if doc["kind"] == "RayCluster":
                specs.append((path.name, doc, doc["spec"]))
            elif doc["kind"] == "RayJob":
                _require(doc["spec"], "RayJobSpec", path.name)
                specs.append((path.name, doc, doc["spec"]["rayClusterSpec"]))
    return specs


def test_check_ray_cluster_spec_rejects_a_missing_required_field() -> None:
    (_, _, spec), *_ = _cluster_specs()
    broken = json.loads(json.dumps(spec))
    del broken["workerGroupSpecs"][0]["groupName"]
    with pytest.raises(AssertionError, match="groupName"):
        check_ray_cluster_spec(broken, "x")


def test_kuberay_manifests_have_the_required_fields_gpus_ports_and_secret() -> None:
    specs = _cluster_specs()
    assert {k for _, d, _ in specs for k in [d["kind"]]} == {"RayCluster", "RayJob"}
    for name, _, spec in specs:
        parts = check_ray_cluster_spec(spec, name)
        head_ports = {p["containerPort"]: p.get("name") for p in parts["head"][0]["ports"]}
        assert head_ports[PORTS["ray_gcs"]] == "gcs"
        assert head_ports[PORTS["ray_dashboard"]] == "dashboard"
        assert head_ports[PORTS["ray_metrics_export"]] == "metrics"
        assert parts["head_params"]["dashboard-port"] == str(PORTS["ray_dashboard"])
        assert parts["head_params"]["metrics-export-port"] == str(PORTS["ray_metrics_export"])
        assert parts["workers"], f"{name}: no worker group"
        for group, containers in parts["workers"]:
            assert group["rayStartParams"]["metrics-export-port"] == str(
                PORTS["ray_metrics_export"]
            )
            (c,) = containers
            res = c["resources"]
            assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "8"
            assert {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"] == PORTS[
                "ray_metrics_export"
            ]
        for c in [*parts["head"], *(c for _, cs in parts["workers"] for c in cs)]:
            _assert_s3_credentials_from_secret(c, name)


def _assert_s3_credentials_from_secret(container: dict[str, Any], where: str) -> None:
    for env in container.get("env", []):
        if env["name"].startswith("AWS_"):
            assert "value" not in env and "secretKeyRef" in env.get("valueFrom", {}), (
                f"{where}: {env['name']} must come from a secret, not inline"
            )
    refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
    assert refs == ["moeyard-s3"], f"{where}: container {container['name']} lacks the S3 secret"


def test_no_credentials_are_written_into_infra() -> None:
    for path in [*K8S_FILES, *RAY_CONFIGS]:
        text = path.read_text()
        # A value after the name (placeholders `...` and `$VAR` aside) is a written secret.
        assert not re.search(
            r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID)\s*[:=]\s*(?!\.\.\.|\$)[\w/+]{8,}", text
        ), path
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), path


def test_rayjob_entrypoint_is_a_valid_launch_of_a_preset() -> None:
    from cluster.config import load_launch_config

    (job,) = [d for d in _yaml_docs(INFRA / "k8s" / "rayjob.yaml") if d["kind"] == "RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "cluster.launch"]
    cfg = load_launch_config(ROOT / argv[3], argv[4:])
    gpus = sum(
        g["replicas"]
        * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert cfg.cluster.use_gpu and cfg.cluster.num_workers == gpus
    assert cfg.run.output_dir.startswith("s3://")


def test_podmonitor_scrapes_the_metrics_port_of_the_moeyard_pods() -> None:
    (pm,) = _yaml_docs(INFRA / "k8s" / "podmonitor.yaml")
    assert [e["port"] for e in pm["spec"]["podMetricsEndpoints"]] == ["metrics"]
    labels = pm["spec"]["selector"]["matchLabels"]
    for _, _, spec in _cluster_specs():
        pods = [spec["headGroupSpec"]["template"]] + [
            g["template"] for g in spec["workerGroupSpecs"]
        ]
        for t in pods:
            assert labels.items() <= t["metadata"]["labels"].items()


# ---- Prometheus and Grafana: ports and metric names --------------------------------------


def exported_metric_names() -> set[str]:
    """The sample names ops/prometheus.py exports, in both spellings (`ray_` under Ray)."""
    from ops.prometheus import METRICS

    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    names = {name + s for name, (kind, _, _) in METRICS.items() for s in suffixes[kind]}
    return names | {"ray_" + n for n in names}


def metric_names_in(expr: str) -> set[str]:
    """The moeyard series a PromQL expression (or a series selector) names, with `(ray_)?`
    regex alternatives read as the plain name."""
    expr = expr.replace("(ray_)?", "")
    return set(re.findall(r"\b(?:ray_)?moeyard_[a-z0-9_]*[a-z0-9]\b(?![:(])", expr))


def test_metric_names_in_reads_selectors() -> None:
    assert metric_names_in(
        'sum(rate({__name__=~"(ray_)?moeyard_tokens_total",run=~"$run"}[1m])) / moeyard:x:y'
        ' + ray_moeyard_mfu + {__name__=~"(ray_)?moeyard_.+"}'
    ) == {"moeyard_tokens_total", "ray_moeyard_mfu"}


def _rules() -> list[dict[str, Any]]:
    (doc,) = _yaml_docs(INFRA / "prometheus" / "moeyard.rules.yml")
    return [r for g in doc["groups"] for r in g["rules"]]


def test_rules_and_dashboard_use_only_exported_metric_names() -> None:
    exported = exported_metric_names()
    assert {"moeyard_tokens_total", "ray_moeyard_step_seconds_bucket", "moeyard_mfu"} <= exported
    used: dict[str, set[str]] = {}
    recorded = {r["record"] for r in _rules() if "record" in r}
    for r in _rules():
        used[f"rule {r.get('record') or r.get('alert')}"] = metric_names_in(r["expr"])
        for name in re.findall(r"\bmoeyard:[a-z0-9_:]+", r["expr"]):
            assert name in recorded, f"rule {r.get('alert')} uses unrecorded {name}"
    (tests,) = _yaml_docs(INFRA / "prometheus" / "moeyard.rules.test.yml")
    for t in tests["tests"]:
        for s in t["input_series"]:
            used[f"rules test input {s['series']}"] = metric_names_in(s["series"])
    with open(INFRA / "grafana" / "provisioning" / "dashboards" / "moeyard.json") as f:
        dash = json.load(f)
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            used[f"panel {panel['title']!r}"] = metric_names_in(target.get("expr", ""))
    for var in dash.get("templating", {}).get("list", []):
        used[f"variable {var['name']}"] = metric_names_in(json.dumps(var.get("query", "")))
    all_used = set().union(*used.values())
    assert len(all_used) >= 15, all_used
    for where, names in used.items():
        assert names <= exported, f"{where} uses {sorted(names - exported)}, not exported by ops/"


def test_throttle_reasons_in_the_rules_are_the_ones_ops_reports() -> None:
    from ops.nvml import CLOCK_EVENT_REASONS

    known = {name for _, name in CLOCK_EVENT_REASONS}
    (alert,) = [r for r in _rules() if r.get("alert") == "MoeyardGpuClockThrottled"]
    reasons = set(re.search(r'reason=~"([^"]+)"', alert["expr"]).group(1).split("|"))
    assert reasons and reasons <= known, reasons - known


def test_ports_agree_between_ray_prometheus_grafana_and_ops() -> None:
    from ops.config import OpsConfig

    (ray_prom,) = _yaml_docs(INFRA / "prometheus" / "ray.yml")
    jobs = {j["job_name"]: j for j in ray_prom["scrape_configs"]}
    sd = "/tmp/ray/prom_metrics_service_discovery.json"  # written by Ray's head node
    assert jobs["ray"]["file_sd_configs"][0]["files"] == [sd]
    assert jobs["dcgm"]["file_sd_configs"][0]["files"] == [sd]
    relabel = jobs["dcgm"]["relabel_configs"][0]
    assert relabel["replacement"].endswith(f":{PORTS['dcgm_exporter']}")
    assert "moeyard.rules.yml" in ray_prom["rule_files"]
    # The ops engineer's config for the prometheus_client endpoint (ops.prometheus=client).
    (client_prom,) = _yaml_docs(INFRA / "prometheus" / "prometheus.yml")
    targets = client_prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"127.0.0.1:{OpsConfig().prometheus_port}"]
    # Grafana's datasource points at Prometheus's port; the dashboard at that datasource.
    (ds_doc,) = _yaml_docs(INFRA / "grafana" / "provisioning" / "datasources" / "moeyard.yaml")
    (ds,) = ds_doc["datasources"]
    assert ds["url"].rstrip("/").endswith(f":{PORTS['prometheus']}")
    with open(INFRA / "grafana" / "provisioning" / "dashboards" / "moeyard.json") as f:
        dash_text = f.read()
    uids = set(re.findall(r'"uid":\s*"([^"]+)"', dash_text)) - {json.loads(dash_text)["uid"]}
    assert uids == {ds["uid"]}
    # The documented table says the same.
    doc = (RUNBOOKS / "README.md").read_text()
    for key, port in PORTS.items():
        assert re.search(rf"\|\s*`?{port}`?\s*\|", doc), f"runbooks/README.md lacks {key} {port}"
    assert re.search(rf"\|\s*`?{OpsConfig().prometheus_port}`?\s*\|", doc)


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package prometheus; scripts/setup.sh)"
)


@needs_promtool
def test_promtool_accepts_the_configs_and_the_rules_compute_what_they_say() -> None:
    prom = INFRA / "prometheus"
    for args in (
        ["check", "config", "--syntax-only", "ray.yml"],
        ["check", "config", "--syntax-only", "prometheus.yml"],
        ["check", "rules", "moeyard.rules.yml"],
        # Known inputs -> expected tokens/s, J/token, MFU, alerts (moeyard.rules.test.yml).
        ["test", "rules", "moeyard.rules.test.yml"],
    ):
        r = subprocess.run([PROMTOOL, *args], cwd=prom, capture_output=True, text=True)
        assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}\n{r.stderr}"


# ---- presets.py: wrong preset, wrong run directory, unreachable cluster ------------------


def test_resolve_preset_by_name_and_path() -> None:
    assert presets.resolve_preset("tiny") == presets.PRESETS_DIR / "tiny.yaml"
    path = str(ROOT / "infra" / "runs" / "tiny.yaml")
    assert presets.resolve_preset(path) == Path(path)
    assert "tiny" in presets.available_presets()


def test_unknown_preset_lists_the_presets_and_the_closest() -> None:
    with pytest.raises(presets.PresetError) as e:
        presets.resolve_preset("tinyy")
    msg = str(e.value)
    assert "unknown preset 'tinyy'" in msg and "did you mean 'tiny'?" in msg
    for name in presets.available_presets():
        assert name in msg
    with pytest.raises(presets.PresetError, match=r"infra/runs/nope.yaml does not exist.*tiny"):
        presets.resolve_preset("infra/runs/nope.yaml")


def test_wrong_run_dir_lists_the_runs_beside_it(tmp_path: Path) -> None:
    (tmp_path / "run-a").mkdir()
    (tmp_path / "run-a" / "metrics.jsonl").write_text("")
    (tmp_path / "run-b" / "checkpoints").mkdir(parents=True)
    (tmp_path / "not-a-run").mkdir()
    presets.check_run_dir(str(tmp_path / "run-a"))
    presets.check_run_dir(str(tmp_path / "run-b"))
    with pytest.raises(presets.RunDirError) as e:
        presets.check_run_dir(str(tmp_path / "run-c"))
    assert "run-c does not exist" in str(e.value)
    assert "runs in " + str(tmp_path) + ": run-a, run-b" in str(e.value)
    with pytest.raises(presets.RunDirError, match="not-a-run holds no run"):
        presets.check_run_dir(str(tmp_path / "not-a-run"))


def test_wrong_run_dir_on_s3(s3_bucket: str) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.pipe(f"{s3_bucket}/runs/good/metrics.jsonl", b"")
    presets.check_run_dir(f"{s3_bucket}/runs/good")
    with pytest.raises(presets.RunDirError, match=r"runs/goood does not exist.*runs: good"):
        presets.check_run_dir(f"{s3_bucket}/runs/goood")


def test_moeyard_command_reports_a_wrong_preset_and_run_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["train", "tiny-typo", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moeyard train: unknown preset 'tiny-typo'") and "tiny" in err
    for cmd, extra in (("report", []), ("export", ["--out", str(tmp_path / "x")])):
        assert cli_main([cmd, str(tmp_path / "missing"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"moeyard {cmd}: {tmp_path / 'missing'} does not exist"), err
    # A name resolves to its file and the command runs.
    assert cli_main(["train", "tiny", "--dry-run", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] > 0


def test_launch_against_a_cluster_address_that_does_not_answer() -> None:
    from tests.prometheus_server import free_port

    port = free_port()  # nothing listens there
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "cluster.launch",
            "infra/runs/tiny.yaml",
            f"cluster.ray_address=127.0.0.1:{port}",
            "cluster.connect_timeout_s=0.5",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 3, r.stderr
    assert f":{port}" in r.stderr and "cluster.ray_address" in r.stderr, r.stderr
    assert "ray start --head" in r.stderr, "the launch error carries ray_address_hint's advice"
    hint = presets.ray_address_hint(f"127.0.0.1:{port}")
    assert "ray start --head" in hint and "RAY_ADDRESS" in hint
