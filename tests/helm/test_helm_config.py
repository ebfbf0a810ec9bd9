"""The kernel's configuration read back from the rendered ConfigMap, loaded the way the kernel
loads it, matches the values."""

from __future__ import annotations

import json
import os

import pytest
from traitlets.config import Application

from helm_testlib import MATRIX, requires_helm

pytestmark = requires_helm

CONFIG_FILE = "sandbox_kernel_config.json"


def kernel_config(objects: list[dict], tmp_path):
    """Write the ConfigMap's file into a directory and load it as SandboxKernelApp does."""
    from sandbox_kernel.kernelapp import SandboxKernelApp

    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    assert set(configmap["data"]) == {CONFIG_FILE}
    (tmp_path / CONFIG_FILE).write_text(configmap["data"][CONFIG_FILE])
    app = SandboxKernelApp()
    # BaseIPythonApplication.load_config_file does exactly this for each of its config dirs
    Application.load_config_file(app, app.config_file_name, path=[str(tmp_path)])
    return app.config


@pytest.fixture
def clean_env(monkeypatch):
    for var in [v for v in os.environ if v.startswith("SANDBOX_KERNEL_") or v == "JUPYTERHUB_USER"]:
        monkeypatch.delenv(var)


def test_rendered_config_is_what_the_values_say(case, render, merged_values, tmp_path, clean_env):
    from sandbox_kernel.backends.kubernetes import KubernetesBackend
    from sandbox_kernel.policy.admin import AdminPolicy

    name, overrides = case
    values = merged_values(overrides)
    config = kernel_config(render(overrides), tmp_path)
    assert config.SandboxKernel.backend_name == "kubernetes"

    backend = KubernetesBackend(config=config)  # traits validate here, as in the kernel
    sandbox, image = values["sandbox"], values["sandbox"]["image"]
    assert backend.image == (f"{image['name']}:{image['tag']}" if image["tag"] else image["name"])
    assert backend.image_pull_policy == image["pullPolicy"]
    assert backend.namespace_template == sandbox["namespaceTemplate"]
    assert (backend.requests, backend.limits, backend.quota) == (sandbox["requests"], sandbox["limits"], sandbox["quota"])
    assert (backend.node_selector, backend.tolerations) == (sandbox["nodeSelector"], sandbox["tolerations"])
    assert backend.enforcers == sandbox["enforcers"]
    assert backend.node_local_dns == ("true" if sandbox["nodeLocalDNS"] else "false")
    assert (backend.start_timeout, backend.schedule_timeout, backend.idle_timeout) == (
        sandbox["startTimeout"], sandbox["scheduleTimeout"], sandbox["idleTimeout"])
    assert backend.runtime_class == (values["gvisor"]["runtimeClassName"] if values["gvisor"]["enabled"] else None)

    admin = AdminPolicy(config=config)  # validates entries, patterns and ranges
    policy = values["policy"]
    assert (admin.mode, admin.entries, admin.presets, admin.locked) == (
        policy["mode"], policy["entries"], policy["presets"], policy["locked"])
    assert admin.user_may_allow == policy["userMayAllow"] and admin.max_entries == policy["maxEntries"]
    assert (admin.always_blocked, admin.cluster_ranges) == (policy["alwaysBlocked"], policy["clusterRanges"])
    admin.default_policy()  # the default policy builds within its own ceiling


def test_exam_mode_refuses_every_change(render, tmp_path, clean_env):
    from sandbox_kernel.policy.admin import AdminPolicy, CeilingRefused
    from sandbox_kernel.policy.model import EgressPolicy

    admin = AdminPolicy(config=kernel_config(render(MATRIX["exam-mode"]), tmp_path))
    current = admin.default_policy()
    assert (current.mode, current.presets) == ("allowlist", ("pypi",))
    assert [(e.value, e.ports) for e in current.entries] == [("exam.example.org", ((443, 443),))]
    with pytest.raises(CeilingRefused):
        admin.check_change(current, EgressPolicy(mode="deny"))


def test_values_are_data_never_code(render, tmp_path, clean_env):
    """Quotes, newlines and template syntax in values reach the kernel as the same strings."""
    from sandbox_kernel.backends.kubernetes import KubernetesBackend

    nasty = {
        "a": 'x"); import os; os.system("id',
        "b": "line\nc.AdminPolicy.locked = False\n",
        "c": "{{ .Release.Name }} ${HOME} `id` \\ </script>",
    }
    objects = render({"sandbox": {"nodeSelector": nasty}})
    text = [o for o in objects if o["kind"] == "ConfigMap"][0]["data"][CONFIG_FILE]
    assert json.loads(text)["KubernetesBackend"]["node_selector"] == nasty
    assert KubernetesBackend(config=kernel_config(objects, tmp_path)).node_selector == nasty


def test_invalid_policy_values_fail_when_the_kernel_loads_them(render, tmp_path, clean_env):
    """The schema checks shapes; the kernel checks meaning (entry syntax) when it starts."""
    from traitlets import TraitError

    from sandbox_kernel.policy.admin import AdminPolicy

    config = kernel_config(render({"policy": {"entries": ["not a valid entry!"]}}), tmp_path)
    with pytest.raises(TraitError, match="AdminPolicy.entries"):
        AdminPolicy(config=config)
