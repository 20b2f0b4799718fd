"""The sync-agent element: its schema, its install hook (run for real against a copy of
its static tree, for systemd and for upstart), and what can be checked here of Lucid
compatibility: POSIX shell only, and no rsync or inotifywait option newer than Lucid's."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from builder.recipe import elements
from builder.core import sh
from syncagent_helpers import AGENT, ELEMENT

HOOK = ELEMENT / "install.d" / "50-sync-agent"
SCRIPTS = [AGENT, HOOK]
LUCID = {"rsync": (3, 0, 7), "inotifywait": (3, 13)}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/setup installs it); this check cannot run")
    return path


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_are_posix_shell_by_dash_checkbashisms_and_shellcheck(script):
    assert script.read_text().startswith("#!/bin/sh\n")
    for argv in ([tool("dash"), "-n", script], [tool("checkbashisms"), "-f", script],
                 [tool("shellcheck"), "--shell=sh", "--severity=style", script]):
        r = sh.run(argv, check=False, quiet=True)
        assert r.returncode == 0, f"{argv[0]}: {r.output}"


def logical_lines(text: str) -> list[str]:
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def options_used(program: str) -> set[str]:
    """Every option the agent passes to `program` (rsync or inotifywait): the words of
    the commands that run it, and of the `set --` lines that build their arguments."""
    found: set[str] = set()
    for line in logical_lines(AGENT.read_text()):
        code = line.strip()
        if program == "rsync":
            wanted = (code.startswith(("run_rsync ", "rsync ")) or
                      (code.startswith("set -- ") and "--link-dest" in code))
            wanted = wanted and "ROOTSYNC_TEST" not in code  # test-only arguments
        else:
            wanted = code.startswith("inotifywait ")
        if wanted:
            for tok in re.findall(r'(?<![\w$@])(--?[A-Za-z][\w-]*)', code):
                found.add(tok)
    return found


def readme_versions(program: str) -> dict[str, tuple[int, ...]]:
    """The README's table: | `option` | program | version |."""
    out = {}
    for m in re.finditer(r"^\|\s*`([^`]+)`\s*\|\s*(\w+)\s*\|\s*([\d.]+)", (ELEMENT / "README.md").read_text(), re.M):
        if m.group(2) == program:
            out[m.group(1)] = tuple(int(x) for x in m.group(3).split("."))
    return out


@pytest.mark.parametrize("program", ["rsync", "inotifywait"])
def test_every_option_used_is_listed_in_the_readme_with_a_version_lucid_has(program):
    used = options_used(program)
    assert used, f"found no {program} options in the agent"
    listed = readme_versions(program)
    short = {o for o in used if re.fullmatch(r"-[A-Za-z]+", o)}
    for o in used - short:
        assert o in listed, f"{program} option {o} is used but not in the README's table"
    for o in short:
        for letter in o[1:]:
            assert f"-{letter}" in listed, f"{program} option -{letter} (in {o}) is not in the README's table"
    for o, version in listed.items():
        assert version <= LUCID[program], f"{program} {o} needs {version}, newer than Lucid's {LUCID[program]}"


def schema() -> dict:
    return yaml.safe_load((ELEMENT / "element.yaml").read_text())["parameters"]


def defaults() -> dict:
    return {k: v["default"] for k, v in schema()["properties"].items()}


def test_the_element_loads_and_its_schema_accepts_the_defaults_and_rejects_bad_values():
    el = elements.load_element(ELEMENT)
    assert el.name == "sync-agent" and {"rsync", "inotify-tools"} <= set(el.packages)
    assert [h.name for h in el.hooks["install.d"]] == ["50-sync-agent"]
    s = schema()
    jsonschema.Draft202012Validator.check_schema(s)
    v = jsonschema.Draft202012Validator(s)
    v.validate(defaults())
    v.validate({"label": "rootsync", "interval": 5, "on_attach": "restore-reboot"})
    for bad in ({"label": "has space"}, {"label": "x" * 17}, {"interval": 0}, {"on_attach": "wipe"},
                {"format_blank": "yes"}, {"excludes": ["relative/path"]}, {"mount_point": "/"},
                {"generations": 1}, {"unknown": 1}):
        assert not v.is_valid(bad), bad


def run_hook(dest: Path, init: str, params: dict) -> sh.Result:
    shutil.copytree(ELEMENT / "static", dest, symlinks=True, dirs_exist_ok=True)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "ROOTSYNC_DESTDIR": str(dest), "BAKE_INIT_SYSTEM": init,
           **elements.parameter_env("sync-agent", params)}
    return sh.run([str(HOOK)], env=env, check=False, quiet=True)


def test_install_hook_for_systemd_writes_the_config_units_timer_and_udev_rule(tmp_path):
    params = {**defaults(), "label": "myvol", "interval": 5, "excludes": ["/var/cache/apt", "/home/*/.cache"],
              "format_blank": True}
    r = run_hook(tmp_path, "systemd", params)
    assert r.returncode == 0, r.output
    conf = (tmp_path / "etc/rootsync.conf").read_text().splitlines()
    for line in ("label=myvol", "interval=5", "debounce=2", "generations=8", "on_attach=restore-reboot",
                 "format_blank=yes", "mount_point=/var/lib/rootsync/volume", "exclude=/var/cache/apt",
                 "exclude=/home/*/.cache", "watch_exclude=/var/log"):
        assert line in conf, line
    units = tmp_path / "etc/systemd/system"
    for name in ("rootsync-attach@.service", "rootsync-detach@.service", "rootsync-attach.service",
                 "rootsync-watch.service", "rootsync-backup.service", "rootsync-backup.timer"):
        assert (units / name).is_file(), name
    for wants, name in (("multi-user.target.wants", "rootsync-watch.service"),
                        ("multi-user.target.wants", "rootsync-attach.service"),
                        ("timers.target.wants", "rootsync-backup.timer")):
        link = units / wants / name
        assert link.is_symlink() and link.resolve() == (units / name).resolve(), link
    rules = (tmp_path / "etc/udev/rules.d/90-rootsync.rules").read_text()
    assert 'ENV{ID_FS_LABEL}=="myvol"' in rules and 'ENV{SYSTEMD_WANTS}+="rootsync-attach@%k.service"' in rules
    assert 'ENV{ID_FS_TYPE}==""' in rules  # the blank-disk rule, format_blank=yes
    assert not [ln for ln in rule_lines(rules) if 'ACTION=="add"' in ln and "RUN+=" in ln]
    assert_remove_rule(rules, "myvol")
    assert "ExecStart=/usr/sbin/rootsync detach /dev/%i" in (units / "rootsync-detach@.service").read_text()
    assert not list(units.glob("*.wants/rootsync-detach*"))  # started by the rule only
    assert oct((tmp_path / "var/lib/rootsync").stat().st_mode & 0o777) == "0o700"
    assert (tmp_path / "var/lib/rootsync/volume").is_dir()
    # The agent reads the written config as the hook meant it.
    st = subprocess.run([str(tmp_path / "usr/sbin/rootsync"), "status", "--json"], capture_output=True, text=True,
                        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "ROOTSYNC_CONF": str(tmp_path / "etc/rootsync.conf"),
                             "ROOTSYNC_ROOT": str(tmp_path), "ROOTSYNC_RUN_DIR": str(tmp_path / "run"),
                             "ROOTSYNC_SYSLOG": "no"})
    assert st.returncode == 0, st.stderr
    got = json.loads(st.stdout)
    assert got["label"] == "myvol" and got["mount_point"] == "/var/lib/rootsync/volume" and not got["mounted"]


def rule_lines(rules: str) -> list[str]:
    return [ln for ln in rules.splitlines() if ln.strip() and not ln.startswith("#")]


def assert_remove_rule(rules: str, label: str) -> None:
    """A removed device that carried the label goes to `rootsync udev-remove`, which
    has the dead mount lazily unmounted outside udev."""
    (line,) = [ln for ln in rule_lines(rules) if 'ACTION=="remove"' in ln]
    assert 'SUBSYSTEM=="block"' in line and f'ENV{{ID_FS_LABEL}}=="{label}"' in line, line
    assert line.endswith('RUN+="/usr/sbin/rootsync udev-remove $env{DEVNAME}"'), line


def test_systemd_accepts_the_units(tmp_path):
    run = run_hook(tmp_path, "systemd", defaults())
    assert run.returncode == 0, run.output
    units = tmp_path / "etc/systemd/system"
    for name in ("attach", "detach"):
        shutil.copy(units / f"rootsync-{name}@.service", tmp_path / f"rootsync-{name}@vdb.service")
    names = [units / n for n in ("rootsync-attach.service", "rootsync-watch.service", "rootsync-backup.service",
                                 "rootsync-backup.timer")] + \
        [tmp_path / "rootsync-attach@vdb.service", tmp_path / "rootsync-detach@vdb.service"]
    r = sh.run([tool("systemd-analyze"), "verify", *map(str, names)], check=False, quiet=True)
    # This machine has no /usr/sbin/rootsync; any other complaint is about the units.
    other = [ln for ln in r.output.splitlines()
             if ln.strip() and "Command /usr/sbin/rootsync is not executable" not in ln]
    assert not other, r.output


def test_install_hook_for_upstart_writes_jobs_cron_and_a_udev_rule_that_hands_off(tmp_path):
    r = run_hook(tmp_path, "upstart", defaults())
    assert r.returncode == 0, r.output
    for job in ("rootsync-watch", "rootsync-attach", "rootsync-detach", "rootsync-boot"):
        text = (tmp_path / f"etc/init/{job}.conf").read_text()
        assert "exec /usr/sbin/rootsync" in text and "console output" in text
    assert "rootsync-device" in (tmp_path / "etc/init/rootsync-attach.conf").read_text()
    detach = (tmp_path / "etc/init/rootsync-detach.conf").read_text()
    assert "start on rootsync-device-removed" in detach and "exec /usr/sbin/rootsync detach $DEVNAME" in detach
    cron = (tmp_path / "etc/cron.d/rootsync").read_text()
    assert re.search(r"^\* \* \* \* \* root /usr/sbin/rootsync backup --if-due", cron, re.M)
    rules = (tmp_path / "etc/udev/rules.d/90-rootsync.rules").read_text()
    assert 'ENV{ID_FS_LABEL}=="rootsync"' in rules
    assert 'RUN+="/usr/sbin/rootsync udev-add $env{DEVNAME}"' in rules
    assert_remove_rule(rules, "rootsync")
    assert 'ID_FS_TYPE}==""' not in rules  # format_blank defaults to no
    assert not (tmp_path / "etc/systemd").exists()
    assert "format_blank=no" in (tmp_path / "etc/rootsync.conf").read_text()


def test_an_empty_watch_excludes_list_means_watch_everything(tmp_path):
    r = run_hook(tmp_path, "systemd", {**defaults(), "watch_excludes": []})
    assert r.returncode == 0, r.output
    conf = (tmp_path / "etc/rootsync.conf").read_text().splitlines()
    assert [ln for ln in conf if ln.startswith("watch_exclude")] == ["watch_exclude="]


@pytest.mark.parametrize("bad,message", [({"on_attach": "wipe"}, "on_attach"), ({"label": "bad label"}, "label"),
                                         ({"interval": "soon"}, "whole numbers")])
def test_install_hook_refuses_values_the_schema_would_refuse(tmp_path, bad, message):
    r = run_hook(tmp_path, "systemd", {**defaults(), **bad})
    assert r.returncode != 0 and message in r.output, r.output
    assert not (tmp_path / "etc/rootsync.conf").exists()


def test_install_hook_refuses_an_unknown_init_system(tmp_path):
    r = run_hook(tmp_path, "sysvinit", defaults())
    assert r.returncode != 0 and "BAKE_INIT_SYSTEM" in r.output


def test_agent_defaults_match_the_schema_defaults():
    text = AGENT.read_text()
    d = defaults()
    for key, var in (("label", "CFG_LABEL"), ("mount_point", "CFG_MOUNT_POINT"), ("interval", "CFG_INTERVAL"),
                     ("debounce", "CFG_DEBOUNCE"), ("generations", "CFG_GENERATIONS"), ("on_attach", "CFG_ON_ATTACH")):
        assert re.search(rf"^\s*{var}={re.escape(str(d[key]))}$", text, re.M), (key, d[key])
    assert re.search(r"^\s*CFG_FORMAT_BLANK=no$", text, re.M) and d["format_blank"] is False
    hook = HOOK.read_text()
    for key in ("label", "mount_point", "interval", "debounce", "generations", "on_attach"):
        assert f"SYNC_AGENT_{key.upper()}:-{d[key]}}}" in hook, key
