"""Policy files (accounts, image catalogue, grants) and the deny-by-default decision."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.errors import InputError
from runner.identity import Identity
from runner.policy import Decision, Policy, SlurmResources, Usage, decide, load_policy, parse_policy_text
from runner.policy.engine import MPI_NETWORK_NOTE, MPI_PID_NOTE
from runner.principals import parse_principal
from runner.spec import JobSpec, parse_job_text

SHA = "9f2c6d3b1a8e4f7c0d5b2a9e8f1c3d7b6a4e2f0c9d8b7a6e5f4c3b2a1d0e9f8c"
FINGERPRINT = "8883491F4268F173C6E5DC49EDECE4F3F38D871E"

# The line numbers of the error tests below refer to this text.
POLICY = f"""\
version = 1

[accounts.clima]
slurm_account = "esm"
partitions = ["expansion", "gpu"]
max_nodes = 4
max_gpus = 8
max_time = "4h"
max_memory = "64G"
max_concurrent_jobs = 10
admins = ["github:team:CliMA/ci-admins"]

[accounts.ocean]
slurm_account = "ocean-2026"
partitions = ["ocean"]

[images.clima-ci]
path = "/groups/esm/images/clima-ci.sif"
sha256 = "{SHA}"

[images.signed]
path = "/groups/esm/images/signed.sif"
signed_by = "{FINGERPRINT}"

[[grants]]
name = "clima-prs"
principals = ["github:team:CliMA/core", "buildkite:pipeline:clima/climaatmos-ci"]
events = ["pull_request", "push"]
refs = ["refs/heads/main", "refs/pull/*"]
forks = false
account = "clima"
images = ["clima-ci"]
binds = ["/groups/esm/data:/data:ro"]
mpi = true
gpus = true
network = false

[[grants]]
name = "ocean-local"
principals = ["local:group:ocean"]
account = "ocean"
images = ["clima-ci", "signed"]
"""

ALICE = Identity(source="github", repository="CliMA/ClimaAtmos.jl", actor="alice", teams=("CliMA/core",),
                 event="pull_request", ref="refs/pull/12/head", fork=False)
MALLORY = Identity(source="github", repository="CliMA/ClimaAtmos.jl", actor="mallory", teams=(),
                   event="pull_request", ref="refs/pull/13/head", fork=True)
OCEAN_USER = Identity(source="local", user="olga", groups=("ocean",))

JOB = '[job]\nname = "t"\nimage = "clima-ci"\ncommand = ["make", "test"]\n'


def _with(old: str, new: str, text: str = POLICY) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def _policy(text: str = POLICY) -> Policy:
    return parse_policy_text(text, "p.toml")


def _error(text: str) -> str:
    with pytest.raises(InputError) as caught:
        parse_policy_text(text, "p.toml")
    return str(caught.value)


def _job(extra: str = "", resources: str = "") -> JobSpec:
    text = JOB + extra + ("\n[job.resources]\n" + resources if resources else "")
    return parse_job_text(text, "job.toml")


# --- reading policies -----------------------------------------------------------------------------

def test_policy_is_read_into_accounts_images_and_grants() -> None:
    policy = _policy()
    clima = policy.accounts["clima"]
    assert (clima.slurm_account, clima.partitions, clima.max_nodes, clima.max_gpus, clima.max_time,
            clima.max_memory_mb, clima.max_concurrent_jobs) == ("esm", ("expansion", "gpu"), 4, 8, 4 * 3600,
                                                                 64 * 1024, 10)
    assert clima.admins == (parse_principal("github:team:CliMA/ci-admins"),)
    assert policy.images["clima-ci"].sha256 == SHA
    assert policy.images["signed"].signed_by == FINGERPRINT
    assert [g.name for g in policy.grants] == ["clima-prs", "ocean-local"]
    assert policy.admins_of("clima") == clima.admins
    assert policy.admins_of("nope") == ()


def test_omitted_grant_fields_take_safe_defaults() -> None:
    grant = _policy().grants[1]
    assert (grant.events, grant.refs, grant.forks, grant.binds, grant.mpi, grant.gpus, grant.network,
            grant.signers, grant.signed_fields) == (None, None, False, (), False, False, False, None, None)


def test_omitted_account_caps_take_small_defaults() -> None:
    ocean = _policy().accounts["ocean"]
    assert (ocean.max_nodes, ocean.max_gpus, ocean.max_time, ocean.default_time, ocean.max_memory_mb,
            ocean.max_concurrent_jobs, ocean.admins) == (1, 0, 3600, None, None, None, ())


def test_image_pins_are_normalised() -> None:
    policy = _policy(_with(f'sha256 = "{SHA}"', f'sha256 = "sha256:{SHA.upper()}"')
                     .replace(f'signed_by = "{FINGERPRINT}"', 'signed_by = "8883 491f 4268 f173 c6e5 '
                                                               'dc49 edec e4f3 f38d 871e"'))
    assert policy.images["clima-ci"].sha256 == SHA
    assert policy.images["signed"].signed_by == FINGERPRINT


def test_a_policy_without_grants_is_valid_and_denies_everything() -> None:
    policy = _policy(POLICY[:POLICY.index("[[grants]]")])
    decision = decide(policy, ALICE, _job())
    assert (decision.allowed, decision.reasons) == (False, (
        "no grant names this identity (it holds: github:org:CliMA, github:repo:CliMA/ClimaAtmos.jl, "
        "github:user:alice, github:team:CliMA/core)",))


@pytest.mark.parametrize(("old", "new", "message"), [
    ("version = 1", "version = 2", "p.toml:1: version: this hpc-runner reads policy version 1, got 2"),
    ("version = 1", "version = 0", "p.toml:1: version: this hpc-runner reads policy version 1, got 0"),
    ("version = 1", 'version = "1"', "p.toml:1: version: must be an integer, got a string"),
    ("version = 1", "# no version", "p.toml: version: is required"),
    # accounts
    ("max_nodes = 4", "max_nodes = 0", "p.toml:6: accounts.clima.max_nodes: must be at least 1, got 0"),
    ("max_nodes = 4", "max_nodes = 1000000000000",
     "p.toml:6: accounts.clima.max_nodes: must be at most 100000, got 1000000000000"),
    ("max_nodes = 4", "max_nodes = 4.5", "p.toml:6: accounts.clima.max_nodes: must be an integer, got a "
                                         "number"),
    ("max_gpus = 8", "max_gpus = -1", "p.toml:7: accounts.clima.max_gpus: must be at least 0, got -1"),
    ('max_time = "4h"', 'max_time = "0h"',
     "p.toml:8: accounts.clima.max_time: '0h' must be longer than zero"),
    ('max_time = "4h"', 'max_time = "90s"',
     "p.toml:8: accounts.clima.max_time: must be a whole number of minutes (Slurm's granularity), got 1m30s"),
    ('max_time = "4h"', "max_time = 4.0",
     "p.toml:8: accounts.clima.max_time: must be a duration such as \"30m\", \"4h\" or \"1-00:00:00\", got "
     "4.0"),
    ('max_memory = "64G"', 'default_time = "5h"', "p.toml:9: accounts.clima.default_time: must not exceed "
                                                  "max_time"),
    ('max_memory = "64G"', 'default_time = "30m30s"',
     "p.toml:9: accounts.clima.default_time: must be a whole number of minutes (Slurm's granularity), got "
     "30m30s"),
    ('max_memory = "64G"', 'max_memory = "lots"',
     "p.toml:9: accounts.clima.max_memory: 'lots' is not a memory size (use \"512M\" or \"16G\")"),
    ("max_concurrent_jobs = 10", "max_concurrent_jobs = 0",
     "p.toml:10: accounts.clima.max_concurrent_jobs: must be at least 1, got 0"),
    ('partitions = ["expansion", "gpu"]', "partitions = []",
     "p.toml:5: accounts.clima.partitions: must list at least one partition (the first is the default)"),
    ('partitions = ["expansion", "gpu"]', 'partitions = ["gpu", "gpu"]',
     "p.toml:5: accounts.clima.partitions[1]: 'gpu' is listed twice"),
    ('partitions = ["expansion", "gpu"]', 'partitions = ["gpu;rm"]',
     "p.toml:5: accounts.clima.partitions[0]: 'gpu;rm' is not a partition name"),
    ('slurm_account = "esm"', "# no slurm account", "p.toml:3: accounts.clima.slurm_account: is required"),
    ('slurm_account = "esm"', 'slurm_account = "esm --qos=high"',
     "p.toml:4: accounts.clima.slurm_account: 'esm --qos=high' is not a Slurm account name"),
    ("max_nodes = 4", "max_node = 4",
     "p.toml:6: accounts.clima.max_node: unknown key (known keys here: admins, caches, default_time, "
     "max_concurrent_jobs, max_cpus_per_task, "
     "max_gpus, max_memory, max_nodes, max_output_bytes, max_queue_time, max_queued_jobs, "
     "max_setup_time, max_tasks, "
     "max_time, partitions, "
     "retry_node_failures, slurm_account)"),
    ('admins = ["github:team:CliMA/ci-admins"]', 'admins = ["github:team:CliMA/*-admins"]',
     "p.toml:11: accounts.clima.admins[0]: 'github:team:CliMA/*-admins': '*' is only allowed as the whole "
     "last "
     "part ('CliMA/*'), never inside a name"),
    ("[accounts.clima]", '[accounts."bad name"]', "p.toml:3: accounts.bad name: 'bad name' is not a valid "
                                                  "account name"),
    # images
    (f'sha256 = "{SHA}"', f'sha256 = "{SHA[:-1]}"',
     "p.toml:19: images.clima-ci.sha256: must be 64 hexadecimal digits (the output of sha256sum)"),
    (f'sha256 = "{SHA}"', f'sha256 = "{SHA}00"',
     "p.toml:19: images.clima-ci.sha256: must be 64 hexadecimal digits (the output of sha256sum)"),
    (f'sha256 = "{SHA}"', f'sha256 = "{SHA[:-1]}g"',
     "p.toml:19: images.clima-ci.sha256: must be 64 hexadecimal digits (the output of sha256sum)"),
    (f'sha256 = "{SHA}"', f'sha256 = "{SHA}"\nsigned_by = "{FINGERPRINT}"',
     "p.toml:17: images.clima-ci: pin the image with exactly one of `sha256` or `signed_by`"),
    (f'sha256 = "{SHA}"', "# unpinned",
     "p.toml:17: images.clima-ci: pin the image with exactly one of `sha256` or `signed_by`"),
    (f'signed_by = "{FINGERPRINT}"', 'signed_by = "alice@example.org"',
     "p.toml:23: images.signed.signed_by: must be a 40-digit PGP key fingerprint"),
    ('path = "/groups/esm/images/clima-ci.sif"', 'path = "clima-ci.sif"',
     "p.toml:18: images.clima-ci.path: image path 'clima-ci.sif' must be an absolute path"),
    ('path = "/groups/esm/images/clima-ci.sif"', 'path = "/groups/../etc/shadow"',
     "p.toml:18: images.clima-ci.path: image path '/groups/../etc/shadow' must not contain '..'"),
    ('path = "/groups/esm/images/clima-ci.sif"', "path = 5", "p.toml:18: images.clima-ci.path: must be a "
                                                             "string"),
    ('path = "/groups/esm/images/clima-ci.sif"',
     'path = "/groups/esm/images/clima-ci.sif"\nurl = "https://x"',
     "p.toml:19: images.clima-ci.url: unknown key (known keys here: path, sha256, signed_by)"),
    # grants
    ('account = "ocean"', 'account = "atmos"',
     "p.toml:41: grants[1].account: no account 'atmos' in this policy (accounts: clima, ocean)"),
    ('images = ["clima-ci", "signed"]', 'images = ["clima-ci", "cuda"]',
     "p.toml:42: grants[1].images[1]: no image 'cuda' in the catalogue (images: clima-ci, signed)"),
    ('images = ["clima-ci", "signed"]', 'images = ["cuda"]',
     "p.toml:42: grants[1].images[0]: no image 'cuda' in the catalogue (images: clima-ci, signed)"),
    ('name = "ocean-local"', 'name = "clima-prs"', "p.toml:39: grants[1].name: another grant is already "
                                                   "named 'clima-prs'"),
    ('name = "ocean-local"', 'name = "ocean local"', "p.toml:39: grants[1].name: 'ocean local' is not a "
                                                     "grant name"),
    ('principals = ["local:group:ocean"]', "principals = []",
     "p.toml:40: grants[1].principals: must name at least one principal"),
    ('principals = ["local:group:ocean"]', "# nobody", "p.toml:38: grants[1].principals: is required"),
    ('principals = ["local:group:ocean"]', 'principals = ["local:group:*"]',
     "p.toml:40: grants[1].principals[0]: 'local:group:*': a wildcard is only allowed as a trailing '/*' "
     "after "
     "an organisation, and local:group names have no organisation part"),
    ('principals = ["local:group:ocean"]', 'principals = ["local:group:ocean", "github:repo:CliMA/*x"]',
     "p.toml:40: grants[1].principals[1]: 'github:repo:CliMA/*x': '*' is only allowed as the whole "
     "last part"),
    ('principals = ["local:group:ocean"]', 'principals = ["github:*:x"]',
     "p.toml:40: grants[1].principals[0]: 'github:*:x': a wildcard is only allowed as a trailing '/*'"),
    ('principals = ["local:group:ocean"]', 'principals = ["github:repo:*/x"]',
     "p.toml:40: grants[1].principals[0]: 'github:repo:*/x': the organisation must be spelled out"),
    ('principals = ["local:group:ocean"]', 'principals = ["local:group:ocean", "local:group:ocean"]',
     "p.toml:40: grants[1].principals[1]: 'local:group:ocean' is listed twice"),
    ('events = ["pull_request", "push"]', 'events = ["pull_request", "pull"]',
     "p.toml:28: grants[0].events[1]: unknown event 'pull' (known: push, pull_request, local, schedule, api, "
     "ui, "
     "trigger, merge_group)"),
    ('refs = ["refs/heads/main", "refs/pull/*"]', 'refs = ["refs/heads/main", "refs/*/head"]',
     "p.toml:29: grants[0].refs[1]: 'refs/*/head': only a trailing '/*' may be a wildcard in a ref"),
    ('refs = ["refs/heads/main", "refs/pull/*"]', 'refs = ["main"]',
     "p.toml:29: grants[0].refs[0]: 'main' is not a git ref"),
    ("forks = false", "fork = false",
     "p.toml:30: grants[0].fork: unknown key (known keys here: account, binds, caches, events, forks, gpus, "
     "images, "
     "mpi, "
     "name, network, principals, refs, setup_network, signed_fields, signers)"),
    ("mpi = true", 'mpi = "yes"', "p.toml:34: grants[0].mpi: must be true or false, got a string"),
    ('events = ["pull_request", "push"]', "events = []",
     "p.toml:28: grants[0].events: must not be empty (omit `events` and any event is allowed)"),
    ('refs = ["refs/heads/main", "refs/pull/*"]', "refs = []",
     "p.toml:29: grants[0].refs: must not be empty (omit `refs` and any ref is allowed)"),
    ("forks = false", "signers = []",
     "p.toml:30: grants[0].signers: must not be empty (omit `signers` and no signature is required)"),
    ('account = "ocean"', 'account = "ocean"\nsigners = ["ocean key"]',
     "p.toml:42: grants[1].signers[0]: 'ocean key' is not a key id"),
    ("forks = false", "signed_fields = []",
     "p.toml:30: grants[0].signed_fields: must not be empty (omit `signed_fields` and nothing needs to be "
     "signed)"),
    ("forks = false", 'signed_fields = ["ref", "branch"]',
     "p.toml:30: grants[0].signed_fields[1]: unknown field 'branch' (known: pipeline, ref, commit, event, "
     "pull_request, teams)"),
    ("forks = false", 'signed_fields = "ref"',
     "p.toml:30: grants[0].signed_fields: must be an array of strings, got a string"),
    ("[[grants]]\nname = \"ocean-local\"", "[grants.extra]\nname = \"ocean-local\"",
     "p.toml:38: grants[0].extra: unknown key"),
])
def test_invalid_policy_names_file_line_and_field(old: str, new: str, message: str) -> None:
    assert _error(_with(old, new)).startswith(message)


@pytest.mark.parametrize(("bind", "message"), [
    ("/:/host", "the source must not be '/'"),
    ("/data:/", "the target must not be '/'"),
    ("/proc:/proc", "the source must not be /proc or below it"),
    ("/sys/fs/cgroup:/cg", "the source must not be /sys or below it"),
    ("/dev:/dev", "the source must not be /dev or below it"),
    ("/groups/esm/data:/dev/shm", "the target must not be /dev or below it"),
    ("//proc:/p", "the source must not be /proc or below it"),
    ("/groups/esm/data:/work", "the target /work is reserved for the runner"),
    ("/groups/esm/../../etc:/etc", "must not contain '..'"),
    ("groups/esm:/data", "must be an absolute path"),
    ("/groups/esm/data:/data:rx", "mode must be 'ro' or 'rw'"),
])
def test_dangerous_binds_in_a_grant_are_refused(bind: str, message: str) -> None:
    error = _error(_with('binds = ["/groups/esm/data:/data:ro"]', f'binds = ["{bind}"]'))
    assert error.startswith("p.toml:33: grants[0].binds[0]: ")
    assert message in error


def test_unknown_top_level_table_is_reported() -> None:
    assert _error(POLICY.replace("version = 1\n", "version = 1\n[defaults]\nmpi = true\n")) == \
        "p.toml:2: defaults: unknown key (known keys here: accounts, grants, images, version)"


def test_grants_written_as_a_table_are_refused() -> None:
    text = POLICY[:POLICY.index("[[grants]]")] + '[grants]\nname = "x"\n'
    assert _error(text) == "p.toml:25: grants: must be an array of tables ([[grants]])"


def test_grant_lines_in_an_array_of_inline_tables_point_at_each_element() -> None:
    text = POLICY[:POLICY.index("[[grants]]")].replace("version = 1\n", "version = 1\ngrants = [\n"
        '  { name = "a", principals = ["local:user:a"], account = "clima" },\n'
        '  { name = "b", principals = ["local:user:b"], account = "clima", images = ["nope"] },\n'
        "]\n")
    assert _error(text) == ("p.toml:4: grants[1].images[0]: no image 'nope' in the catalogue "
                            "(images: clima-ci, signed)")


def test_grant_lines_in_multiline_arrays_point_at_the_element() -> None:
    text = _with('images = ["clima-ci", "signed"]', 'images = [\n  "clima-ci",\n  "nope",\n]')
    assert _error(text) == ("p.toml:44: grants[1].images[1]: no image 'nope' in the catalogue "
                            "(images: clima-ci, signed)")


def test_a_third_grant_is_placed_after_the_second() -> None:
    text = POLICY + ('\n[[grants]]\nname = "third"\nprincipals = ["local:user:x"]\naccount = "clima"\n'
                     'images = ["x"]\n')
    assert _error(text) == ("p.toml:48: grants[2].images[0]: no image 'x' in the catalogue "
                            "(images: clima-ci, signed)")


def test_a_two_megabyte_policy_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY + "#" * (2 * 1024 * 1024))
    with pytest.raises(InputError) as caught:
        load_policy(path)
    assert str(caught.value) == f"{path}: file is larger than 1048576 bytes"


def test_policy_syntax_error_gives_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(_with("mpi = true", "mpi = tru"))
    with pytest.raises(InputError) as caught:
        load_policy(path)
    assert str(caught.value).startswith(f"{path}:34: invalid TOML: ")


def test_load_policy_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(_with("version = 1", "version = 2"))
    with pytest.raises(InputError) as caught:
        load_policy(path)
    assert str(caught.value) == f"{path}:1: version: this hpc-runner reads policy version 1, got 2"


# --- deciding -------------------------------------------------------------------------------------

def test_allowed_decision_names_the_grant_and_the_effective_slurm_request() -> None:
    decision = decide(_policy(), ALICE, _job())
    assert decision.allowed
    assert (decision.grant, decision.account, decision.reasons) == ("clima-prs", "clima", ())
    assert decision.slurm == SlurmResources(
        account="esm", partition="expansion", nodes=1, tasks=1, tasks_per_node=None, cpus_per_task=1, gpus=0,
        memory_mb=64 * 1024, time_seconds=3600, queue_seconds=24 * 3600)


def test_omitted_tasks_default_to_one_per_node() -> None:
    decision = decide(_policy(), ALICE, _job(resources="nodes = 3\n"))
    assert decision.slurm is not None
    assert (decision.slurm.nodes, decision.slurm.tasks) == (3, 3)


def test_a_job_naming_a_partition_gets_it() -> None:
    decision = decide(_policy(), ALICE, _job(resources='partition = "gpu"\ngpus = 2\n'))
    assert decision.slurm is not None
    assert (decision.slurm.partition, decision.slurm.gpus, decision.gpus) == ("gpu", 2, True)


def test_omitted_walltime_is_the_accounts_max_time_when_shorter_than_an_hour() -> None:
    policy = _policy(_with('max_time = "4h"', 'max_time = "20m"'))
    slurm = decide(policy, ALICE, _job()).slurm
    assert slurm is not None and slurm.time_seconds == 20 * 60


def test_omitted_walltime_is_the_accounts_default_time_when_set() -> None:
    policy = _policy(_with('max_memory = "64G"', 'default_time = "2h"'))
    slurm = decide(policy, ALICE, _job()).slurm
    assert slurm is not None and slurm.time_seconds == 2 * 3600


def test_omitted_memory_asks_for_the_accounts_cap_so_slurm_cannot_give_more() -> None:
    slurm = decide(_policy(), ALICE, _job()).slurm
    assert slurm is not None and slurm.memory_mb == 64 * 1024


def test_omitted_memory_stays_unset_when_the_account_has_no_cap() -> None:
    slurm = decide(_policy(), OCEAN_USER, _job()).slurm
    assert slurm is not None and slurm.memory_mb is None


def test_a_job_within_every_cap_is_allowed_at_the_caps() -> None:
    job = _job(extra='binds = ["/groups/esm/data:/data:ro"]\n[job.mpi]\nenabled = true\n',
               resources='account = "clima"\npartition = "gpu"\nnodes = 4\ngpus = 8\ntime = "4h"\nmemory = '
                         '"64G"\n')
    decision = decide(_policy(), ALICE, job, Usage(running_by_account={"clima": 9}))
    assert (decision.allowed, decision.reasons) == (True, ())


def test_a_denial_lists_every_rule_the_job_breaks() -> None:
    job = _job(extra='binds = ["/home:/home:rw"]\nnetwork = true\n', resources='nodes = 16\ntime = '
                                                                               '"2-00:00:00"\n')
    decision = decide(_policy(), ALICE, job)
    assert decision.to_json()["reasons"] == [
        "grant 'clima-prs': bind /home:/home:rw is not granted",
        "grant 'clima-prs': the job asks for network access and the grant has network = false",
        "grant 'clima-prs': 16 nodes exceed account clima's max_nodes = 4",
        "grant 'clima-prs': walltime 2d exceeds account clima's max_time = 4h",
    ]
    assert (decision.allowed, decision.grant, decision.slurm) == (False, None, None)


def test_an_identity_no_grant_names_is_denied_saying_what_it_holds() -> None:
    decision = decide(_policy(), Identity(source="local", user="eve", groups=("users",)), _job())
    assert decision.reasons == ("no grant names this identity (it holds: local:user:eve, local:group:users)",)


def test_a_fork_of_a_core_member_is_denied_because_of_forks() -> None:
    fork = Identity(source="github", repository="CliMA/ClimaAtmos.jl", actor="alice", teams=("CliMA/core",),
                    event="pull_request", ref="refs/pull/13/head", fork=True)
    decision = decide(_policy(), fork, _job())
    assert decision.reasons == (
        "grant 'clima-prs': the job comes from a fork and the grant has forks = false",)


@pytest.mark.parametrize(("identity", "reason"), [
    (Identity(source="github", repository="CliMA/A.jl", teams=("CliMA/core",), event="schedule",
              ref="refs/heads/main"),
     "event 'schedule' is not one of the grant's events (pull_request, push)"),
    (Identity(source="github", repository="CliMA/A.jl", teams=("CliMA/core",), event="push",
              ref="refs/heads/feature"),
     "ref 'refs/heads/feature' is not one of the grant's refs (refs/heads/main, refs/pull/*)"),
    (Identity(source="github", repository="CliMA/A.jl", teams=("CliMA/core",), event="push"),
     "the grant is limited to refs (refs/heads/main, refs/pull/*) and the job has no ref"),
    (Identity(source="github", repository="CliMA/A.jl", teams=("CliMA/core",), event="push",
              ref="refs/heads/main", fork=True),
     "the job comes from a fork and the grant has forks = false"),
])
def test_each_context_rule_of_a_grant_is_checked(identity: Identity, reason: str) -> None:
    assert decide(_policy(), identity, _job()).reasons == (f"grant 'clima-prs': {reason}",)


@pytest.mark.parametrize(("extra", "resources", "reason"), [
    ("", 'account = "ocean"', "the job asks for account 'ocean'; the grant is for 'clima'"),
    ("", 'account = "nope"', "the job asks for account 'nope'; the grant is for 'clima'"),
    ("", 'partition = "debug"',
     "partition 'debug' is not one of account clima's partitions (expansion, gpu)"),
    ("", "nodes = 5", "5 nodes exceed account clima's max_nodes = 4"),
    ("", "gpus = 9", "9 GPUs exceed account clima's max_gpus = 8"),
    ("", 'time = "4h1m"', "walltime 4h1m exceeds account clima's max_time = 4h"),
    ("", 'memory = "65G"', "memory 65G exceeds account clima's max_memory = 64G"),
    ('binds = ["/groups/esm/data:/data:rw"]\n', "", "bind /groups/esm/data:/data:rw is not granted"),
    ('binds = ["/groups/esm/data:/elsewhere:ro"]\n', "",
     "bind /groups/esm/data:/elsewhere:ro is not granted"),
    ("network = true\n", "", "the job asks for network access and the grant has network = false"),
])
def test_each_resource_and_sandbox_rule_is_checked(extra: str, resources: str, reason: str) -> None:
    assert decide(_policy(), ALICE, _job(extra=extra, resources=resources)).reasons == ("grant 'clima-prs': "
                                                                                        f"{reason}",)


def test_an_image_outside_the_catalogue_is_denied() -> None:
    job = parse_job_text(JOB.replace('"clima-ci"', '"other"'))
    assert decide(_policy(), ALICE, job).reasons == ("grant 'clima-prs': image 'other' is not in the "
                                                     "policy's catalogue",)


def test_an_image_the_grant_does_not_list_is_denied() -> None:
    job = parse_job_text(JOB.replace('"clima-ci"', '"signed"'))
    assert decide(_policy(), ALICE, job).reasons == (
        "grant 'clima-prs': image 'signed' is not among the grant's images (clima-ci)",)


@pytest.mark.parametrize(("extra", "resources", "reason"), [
    ("[job.mpi]\nenabled = true\n", "", "the job uses MPI and the grant has mpi = false"),
    ("", "gpus = 1", "the job asks for 1 GPUs and the grant has gpus = false"),
    ("network = true\n", "", "the job asks for network access and the grant has network = false"),
])
def test_mpi_gpus_and_network_default_to_false_in_a_grant(extra: str, resources: str, reason: str) -> None:
    reasons = decide(_policy(), OCEAN_USER, _job(extra=extra, resources=resources)).reasons
    assert f"grant 'ocean-local': {reason}" in reasons


def test_a_job_over_the_concurrency_cap_is_allowed_to_wait_for_a_place() -> None:
    policy, job = _policy(), _job()
    under = decide(policy, ALICE, job, Usage(running_by_account={"clima": 9}))
    assert (under.allowed, under.waits) == (True, None)
    at_cap = decide(policy, ALICE, job, Usage(running_by_account={"clima": 10}))
    assert (at_cap.allowed, at_cap.waits) == (True, "account clima runs 10 of 10 jobs")
    behind = decide(policy, ALICE, job, Usage(running_by_account={"clima": 13}))
    assert (behind.allowed, behind.waits) == (True, "account clima runs 10 of 10 jobs; 3 wait before it")
    assert decide(policy, ALICE, job, Usage(running_by_account={"ocean": 1000})).waits is None


def test_max_queued_jobs_bounds_the_accounts_waiting_list() -> None:
    policy = _policy(_with("max_concurrent_jobs = 10", "max_concurrent_jobs = 10\nmax_queued_jobs = 2"))
    job = _job()
    assert decide(policy, ALICE, job, Usage(running_by_account={"clima": 11})).waits == (
        "account clima runs 10 of 10 jobs; 1 waits before it")
    assert decide(policy, ALICE, job, Usage(running_by_account={"clima": 12})).reasons == (
        "grant 'clima-prs': account clima runs 10 of 10 jobs; 2 wait before it, and its waiting list is "
        "full (max_queued_jobs = 2)",)
    nobody_waits = _policy(_with("max_concurrent_jobs = 10", "max_concurrent_jobs = 10\nmax_queued_jobs = 0"))
    assert not decide(nobody_waits, ALICE, job, Usage(running_by_account={"clima": 10})).allowed
    assert decide(nobody_waits, ALICE, job, Usage(running_by_account={"clima": 9})).allowed


def test_max_queued_jobs_defaults_to_a_hundred() -> None:
    assert _policy().accounts["clima"].max_queued_jobs == 100
    assert decide(_policy(), ALICE, _job(), Usage(running_by_account={"clima": 109})).allowed
    assert not decide(_policy(), ALICE, _job(), Usage(running_by_account={"clima": 110})).allowed


def test_queue_time_defaults_to_the_accounts_max_queue_time_and_may_not_exceed_it() -> None:
    policy = _policy(_with('max_time = "4h"', 'max_time = "4h"\nmax_queue_time = "2h"'))
    slurm = decide(policy, ALICE, _job()).slurm
    assert slurm is not None and slurm.queue_seconds == 2 * 3600
    asked = decide(policy, ALICE, _job(resources='queue_time = "20s"')).slurm
    assert asked is not None and asked.queue_seconds == 20
    assert decide(policy, ALICE, _job(resources='queue_time = "3h"')).reasons == (
        "grant 'clima-prs': queue_time 3h exceeds account clima's max_queue_time = 2h",)
    assert decide(_policy(), ALICE, _job()).slurm.queue_seconds == 24 * 3600  # type: ignore[union-attr]


def test_an_account_without_a_concurrency_cap_is_not_limited() -> None:
    assert decide(_policy(), OCEAN_USER, _job(), Usage(running_by_account={"ocean": 10**6})).allowed


def test_caps_of_another_account_are_not_reported_when_the_job_names_a_different_account() -> None:
    reasons = decide(_policy(), ALICE, _job(resources='account = "ocean"\nnodes = 50')).reasons
    assert reasons == ("grant 'clima-prs': the job asks for account 'ocean'; the grant is for 'clima'",)


def test_signed_grant_requires_one_of_its_signers() -> None:
    policy = _policy(_with("forks = false", 'forks = false\nsigners = ["clima-2026"]'))
    pipeline = Identity(source="buildkite", organization="clima", pipeline="climaatmos-ci", branch="main")
    assert decide(policy, pipeline, _job()).reasons == (
        "grant 'clima-prs': the job is unsigned; the grant requires a signature by one of (clima-2026)",)
    wrong = Identity(source="buildkite", organization="clima", pipeline="climaatmos-ci", branch="main",
                     signer="clima-2025")
    assert decide(policy, wrong, _job()).reasons == (
        "grant 'clima-prs': the job is signed by 'clima-2025'; the grant requires a signature by one of "
        "(clima-2026)",)
    right = Identity(source="buildkite", organization="clima", pipeline="climaatmos-ci", branch="main",
                     signer="clima-2026")
    assert decide(policy, right, _job()).allowed


def test_a_grant_with_signed_fields_covers_only_identities_whose_signature_covers_them() -> None:
    policy = _policy(_with("forks = false", 'forks = false\nsigned_fields = ["ref", "pull_request"]'))
    assert policy.grants[0].signed_fields == ("ref", "pull_request")
    asserted = Identity(source="buildkite", organization="clima", pipeline="climaatmos-ci", branch="main",
                        signer="clima-2026", signed=("ref",))
    assert decide(policy, asserted, _job()).reasons == (
        "grant 'clima-prs': the job's pull_request is not signed (Buildkite asserts it); the grant requires "
        "signed_fields (ref, pull_request)",)
    unsigned = Identity(source="buildkite", organization="clima", pipeline="climaatmos-ci", branch="main")
    assert decide(policy, unsigned, _job()).reasons == (
        "grant 'clima-prs': the job's ref, pull_request are not signed (Buildkite asserts them); the grant "
        "requires signed_fields (ref, pull_request)",)
    signed = Identity(source="buildkite", organization="clima", pipeline="climaatmos-ci", branch="main",
                      signed=("pull_request", "ref", "teams"))
    decision = decide(policy, signed, _job())
    assert (decision.allowed, decision.signed_fields) == (True, ("ref", "pull_request"))
    assert decision.to_json()["signed_fields"] == ["ref", "pull_request"]
    # Only Buildkite steps are signed: a GitHub identity never satisfies signed_fields.
    github = decide(policy, ALICE, _job())
    assert github.reasons == ("grant 'clima-prs': the job's ref, pull_request are not signed; the grant "
                              "requires signed_fields (ref, pull_request)",)


def test_a_later_grant_allows_what_an_earlier_one_denies() -> None:
    both = Identity(source="github", repository="CliMA/A.jl", teams=("CliMA/core",), event="push",
                    ref="refs/heads/main")
    policy = _policy(POLICY + '\n[[grants]]\nname = "images"\nprincipals = ["github:org:CliMA"]\n'
                              'account = "clima"\nimages = ["signed"]\n')
    job = parse_job_text(JOB.replace('"clima-ci"', '"signed"'))
    decision = decide(policy, both, job)
    assert (decision.allowed, decision.grant) == (True, "images")


def test_the_first_covering_grant_in_file_order_is_named() -> None:
    policy = _policy(_with('name = "ocean-local"', 'name = "second"')
                     .replace('principals = ["local:group:ocean"]', 'principals = ["github:org:CliMA"]')
                     .replace('account = "ocean"', 'account = "clima"'))
    assert decide(policy, ALICE, _job()).grant == "clima-prs"
    assert decide(policy.with_grants(tuple(reversed(policy.grants))), ALICE, _job()).grant == "second"


def test_a_denial_reports_the_reasons_of_every_grant_that_names_the_identity() -> None:
    policy = _policy(POLICY + '\n[[grants]]\nname = "orgwide"\nprincipals = ["github:org:CliMA"]\n'
                              'account = "clima"\nimages = ["signed"]\n')
    decision = decide(policy, ALICE, _job(resources="nodes = 5"))
    assert decision.reasons == (
        "grant 'clima-prs': 5 nodes exceed account clima's max_nodes = 4",
        "grant 'orgwide': image 'clima-ci' is not among the grant's images (signed)",
        "grant 'orgwide': 5 nodes exceed account clima's max_nodes = 4",
    )


def test_an_mpi_job_without_network_is_told_it_shares_the_host_network_and_pids() -> None:
    decision = decide(_policy(), ALICE, _job(extra="[job.mpi]\nenabled = true\n"))
    assert decision.notes == (MPI_NETWORK_NOTE, MPI_PID_NOTE)
    assert decision.network_isolated is False


def test_a_plain_job_without_network_is_isolated() -> None:
    decision = decide(_policy(), ALICE, _job())
    assert (decision.notes, decision.network_isolated) == ((), True)


def test_a_denied_job_is_never_network_isolated() -> None:
    assert decide(_policy(), MALLORY, _job()).network_isolated is False


def test_allowed_decision_json_has_exactly_the_documented_shape() -> None:
    data = decide(_policy(), ALICE, _job(resources='time = "90s"')).to_json()
    assert data == {
        "allowed": True, "grant": "clima-prs", "account": "clima",
        "slurm": {"account": "esm", "partition": "expansion", "nodes": 1, "tasks": 1, "tasks_per_node": None,
                  "cpus_per_task": 1, "gpus": 0, "memory": "64G", "time": "0-00:02:00", "time_seconds": 90,
                  "queue_time": "1d", "queue_time_seconds": 24 * 3600},
        "caps": {"max_nodes": 4, "max_tasks": 256, "max_cpus_per_task": 16, "max_gpus": 8,
                 "max_memory": "64G", "max_time": "4h", "max_output_bytes": 1024 ** 3,
                 "max_queue_time": "1d"},
        "reasons": [], "notes": [],
        "principals": ["github:org:CliMA", "github:repo:CliMA/ClimaAtmos.jl", "github:user:alice",
                       "github:team:CliMA/core"],
        "image": "clima-ci",
        "caches": {}, "setup": {"network": False, "network_isolated": True, "max_time": "30m"},
        "sandbox": {"mpi": False, "network": False, "gpus": False, "network_isolated": True},
        "retry_node_failure": False, "signed_fields": [], "waits": None,
    }


def test_denied_decision_json_has_exactly_the_documented_shape() -> None:
    data = decide(_policy(), MALLORY, _job()).to_json()
    assert data == {
        "allowed": False, "grant": None, "account": None, "slurm": None, "caps": None,
        "reasons": ["no grant names this identity (it holds: github:org:CliMA, "
                    "github:repo:CliMA/ClimaAtmos.jl, "
                    "github:user:mallory)"],
        "notes": [],
        "principals": ["github:org:CliMA", "github:repo:CliMA/ClimaAtmos.jl", "github:user:mallory"],
        "image": "clima-ci",
        "caches": {}, "setup": {"network": False, "network_isolated": False, "max_time": None},
        "sandbox": {"mpi": False, "network": False, "gpus": False, "network_isolated": False},
        "retry_node_failure": False, "signed_fields": [], "waits": None,
    }


def test_decision_json_is_identical_for_identical_inputs() -> None:
    job = _job(extra='binds = ["/x:/y"]\nnetwork = true\n', resources="nodes = 9\ngpus = 99")
    first = json.dumps(decide(_policy(), ALICE, job).to_json())
    second = json.dumps(decide(_policy(), ALICE, _job(extra='binds = ["/x:/y"]\nnetwork = true\n',
                                                      resources="nodes = 9\ngpus = 99")).to_json())
    assert first == second


def test_decision_is_a_value() -> None:
    assert Decision(False, reasons=("x",)) == Decision(False, reasons=("x",))


# --- tasks and CPUs: capped for every job, whichever executor runs it ----------------------------

MPI = "[job.mpi]\nenabled = true\n"


def test_ten_million_ranks_are_denied_by_the_default_task_cap() -> None:
    decision = decide(_policy(), ALICE, _job(extra=MPI, resources="tasks = 10000000"))
    assert decision.reasons == ("grant 'clima-prs': 10000000 tasks exceed account clima's max_tasks = 256",)


def test_cpus_per_task_beyond_the_default_cap_are_denied() -> None:
    decision = decide(_policy(), ALICE, _job(resources="cpus_per_task = 17"))
    assert decision.reasons == (
        "grant 'clima-prs': 17 CPUs per task exceed account clima's max_cpus_per_task = 16",)


def test_omitted_task_caps_allow_64_tasks_per_node_and_16_cpus_per_task() -> None:
    policy = _policy()
    assert (policy.accounts["clima"].task_cap, policy.accounts["clima"].max_cpus_per_task) == (4 * 64, 16)
    assert (policy.accounts["ocean"].task_cap, policy.accounts["ocean"].max_cpus_per_task) == (64, 16)
    assert decide(policy, ALICE, _job(extra=MPI, resources="tasks = 256\ncpus_per_task = 16")).allowed


def test_an_accounts_own_task_caps_apply() -> None:
    policy = _policy(_with("max_gpus = 8", "max_gpus = 8\nmax_tasks = 8\nmax_cpus_per_task = 2"))
    assert decide(policy, ALICE, _job(extra=MPI, resources="tasks = 8\ncpus_per_task = 2")).allowed
    assert decide(policy, ALICE, _job(extra=MPI, resources="tasks = 9\ncpus_per_task = 3")).reasons == (
        "grant 'clima-prs': 9 tasks exceed account clima's max_tasks = 8",
        "grant 'clima-prs': 3 CPUs per task exceed account clima's max_cpus_per_task = 2",
    )


@pytest.mark.parametrize(("new", "message"), [
    ("max_tasks = 0", "p.toml:8: accounts.clima.max_tasks: must be at least 1, got 0"),
    ("max_tasks = 3", "p.toml:8: accounts.clima.max_tasks: must be at least max_nodes (4): every node "
                      "of a job runs at least one task"),
    ("max_tasks = 20000000", "p.toml:8: accounts.clima.max_tasks: must be at most 10000000, got 20000000"),
    ('max_tasks = "8"', "p.toml:8: accounts.clima.max_tasks: must be an integer, got a string"),
    ("max_cpus_per_task = 0", "p.toml:8: accounts.clima.max_cpus_per_task: must be at least 1, got 0"),
    ("max_cpus_per_task = 5000",
     "p.toml:8: accounts.clima.max_cpus_per_task: must be at most 4096, got 5000"),
])
def test_task_caps_are_validated(new: str, message: str) -> None:
    assert _error(_with("max_gpus = 8", f"max_gpus = 8\n{new}")) == message


def test_an_allowed_decision_shows_the_caps_it_was_held_to() -> None:
    caps = decide(_policy(), ALICE, _job()).to_json()["caps"]
    assert caps == {"max_nodes": 4, "max_tasks": 256, "max_cpus_per_task": 16, "max_gpus": 8,
                    "max_memory": "64G", "max_time": "4h", "max_output_bytes": 1024 ** 3,
                    "max_queue_time": "1d"}
    assert decide(_policy(), MALLORY, _job()).to_json()["caps"] is None


def test_grants_name_gitlab_groups_projects_and_identity_provider_groups() -> None:
    policy = _policy(POLICY + """
[[grants]]
name = "ocean-gitlab"
principals = ["gitlab:group:climate/ocean", "gitlab:project:climate/atmos/*", "idp:group:ocean-modellers"]
events = ["push", "api"]
refs = ["refs/heads/main"]
account = "ocean"
images = ["clima-ci"]
""")
    assert [str(p) for p in policy.grants[2].principals] == [
        "gitlab:group:climate/ocean", "gitlab:project:climate/atmos/*", "idp:group:ocean-modellers"]
    # A project in a subgroup of the granted group holds that group too.
    deep = Identity(source="gitlab", project="climate/ocean/deep/solver", actor="olga", event="push",
                    ref="refs/heads/main")
    assert decide(policy, deep, _job()).grant == "ocean-gitlab"
    other = Identity(source="gitlab", project="climate/oceanx/solver", event="push", ref="refs/heads/main")
    assert decide(policy, other, _job()).reasons == (
        "no grant names this identity (it holds: gitlab:group:climate, gitlab:group:climate/oceanx, "
        "gitlab:project:climate/oceanx/solver)",)
    modeller = Identity(source="idp", user="olga@example.org", groups=("ocean-modellers",))
    decision = decide(policy, modeller, _job())
    assert decision.reasons == (
        "grant 'ocean-gitlab': the grant is limited to refs (refs/heads/main) and the job has no ref",)


def test_an_unknown_principal_type_in_a_grant_names_the_known_ones() -> None:
    message = _error(_with('principals = ["local:group:ocean"]', 'principals = ["gitlab:team:ocean"]'))
    assert "unknown principal type gitlab:team" in message
    assert "gitlab:group, gitlab:project, gitlab:user, idp:user, idp:group" in message
