"""The plugin registry: built-ins and third-party packages through the `hvctl.plugins` entry points."""

import json
import os
import subprocess
import sys

import pytest

from conftest import run_cli
from hvctl import plugins
from hvctl.errors import HvctlError


@pytest.mark.slow
def test_builtins_are_listed_by_kind():
    done = run_cli("plugins", "list", "--json")
    assert done.returncode == 0, done.stderr
    found = {(p["kind"], p["name"]): p for p in json.loads(done.stdout)["plugins"]}
    for key in [("captioner", "toy"), ("captioner", "vlm"), ("rewriter", "lexicon"), ("rewriter", "llm"),
                ("filter", "clarity"), ("filter", "motion"), ("filter", "text_area")]:
        assert key in found and found[key]["description"], key
    assert found[("captioner", "toy")]["source"] == "hvctl: hvctl_toy"
    only = json.loads(run_cli("plugins", "list", "--kind", "rewriter", "--json").stdout)["plugins"]
    assert {p["kind"] for p in only} == {"rewriter"}


def test_unknown_names_and_kinds_list_the_choices():
    with pytest.raises(HvctlError, match=r"unknown rewriter 'gpt' \(choices: .*lexicon.*llm"):
        plugins.get("rewriter", "gpt")
    with pytest.raises(HvctlError, match="unknown plugin kind 'painter'"):
        plugins.available("painter")
    with pytest.raises(HvctlError, match=r"rewriter 'lexicon': bad options \['colour'\]"):
        plugins.create("rewriter", "lexicon", colour="red")


def test_a_name_registered_twice_is_an_error(monkeypatch):
    monkeypatch.setattr(plugins, "_registry", dict(plugins._registry))
    plugins.load_entry_points()

    class Another:
        """Another toy captioner."""

    with pytest.raises(HvctlError, match="captioner 'toy' is registered twice"):
        plugins.register("captioner", "toy")(Another)


def write_distribution(site, name, entry_point, module_source):
    """An installed distribution as importlib.metadata finds it: a module and its .dist-info."""
    (site / f"{name}.py").write_text(module_source)
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[hvctl.plugins]\n{entry_point} = {name}\n")


def run_with_site(site, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]), "CI": "1"}
    return subprocess.run([sys.executable, "-m", "hvctl", *args], capture_output=True, text=True, env=env, timeout=120)


def test_a_third_party_package_adds_plugins_through_its_entry_point(tmp_path):
    write_distribution(tmp_path, "acme_rewriters", "acme", '''
from hvctl.plugins import register

@register("rewriter", "shout")
class Shout:
    """Upper-cases the prompt."""
    def rewrite(self, prompt, mode="normal"):
        return prompt.upper()
''')
    listed = run_with_site(tmp_path, "plugins", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    entry = [p for p in json.loads(listed.stdout)["plugins"] if p["name"] == "shout"]
    assert entry == [{"kind": "rewriter", "name": "shout", "source": "acme_rewriters: acme_rewriters",
                      "description": "Upper-cases the prompt."}]
    used = run_with_site(tmp_path, "rewrite", "a red circle", "--rewriter", "shout")
    assert used.returncode == 0 and used.stdout.strip() == "A RED CIRCLE"


def test_a_broken_plugin_package_is_named_in_one_line(tmp_path):
    write_distribution(tmp_path, "broken_plugin", "broken", "import not_installed_anywhere\n")
    done = run_with_site(tmp_path, "plugins", "list")
    assert done.returncode == 1
    assert "plugin entry point 'broken' (broken_plugin) failed to load: ModuleNotFoundError" in done.stderr
    assert "Traceback" not in done.stderr
