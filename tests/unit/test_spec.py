"""The job spec parser: strict, typed, and every error names file, line and field."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from runner.binds import Bind
from runner.errors import InputError
from runner.spec import JobSpec, Resources, load_job, parse_job_mapping, parse_job_text, spec_from_json
from runner.tomlsource import MAX_KEY_PARTS, MAX_NESTING, parse_toml

# The example job of policies/examples/mpi-tests.toml; the line numbers of the error tests below
# refer to this text.
EXAMPLE_JOB = """\
[job]
name = "mpi-tests"
image = "clima-ci"
command = ["julia", "--project", "test/runtests.jl"]
env = { JULIA_NUM_THREADS = "4" }
binds = ["/groups/esm/data:/data:ro"]
network = false

[job.resources]
account = "clima"
partition = "expansion"
nodes = 2
tasks = 8
cpus_per_task = 4
gpus = 0
memory = "16G"
time = "30m"

[job.mpi]
enabled = true
"""

MINIMAL_JOB = '[job]\nname = "smoke"\nimage = "smoke"\ncommand = ["true"]\n'


def _with(old: str, new: str, text: str = EXAMPLE_JOB) -> str:
    """The job text with one line replaced (so that every other line keeps its number)."""
    assert text.count(old) == 1, old
    return text.replace(old, new)


def _error(text: str, name: str = "job.toml") -> InputError:
    with pytest.raises(InputError) as caught:
        parse_job_text(text, name)
    return caught.value


def test_example_job_parses_into_typed_objects() -> None:
    spec = parse_job_text(EXAMPLE_JOB, "job.toml")
    assert spec == JobSpec(
        name="mpi-tests", image="clima-ci", command=("julia", "--project", "test/runtests.jl"),
        env={"JULIA_NUM_THREADS": "4"}, binds=(Bind("/groups/esm/data", "/data", "ro"),),
        network=False, mpi=True,
        resources=Resources(account="clima", partition="expansion", nodes=2, tasks=8,
                            cpus_per_task=4, gpus=0, memory_mb=16 * 1024, time_seconds=1800))


def test_minimal_job_leaves_every_resource_to_the_policy() -> None:
    spec = parse_job_text(MINIMAL_JOB)
    assert spec.resources == Resources()
    assert (spec.script, spec.binds, spec.network, spec.mpi, dict(spec.env)) == (None, (), False, False, {})


def test_script_is_accepted_instead_of_command() -> None:
    spec = parse_job_text(_with('command = ["true"]', 'script = """\nmake\nmake test\n"""', MINIMAL_JOB))
    assert (spec.command, spec.script) == (None, "make\nmake test\n")


def test_tasks_per_node_sets_the_task_count() -> None:
    spec = parse_job_text(MINIMAL_JOB + "[job.resources]\nnodes = 3\ntasks_per_node = 4\n")
    assert (spec.resources.nodes, spec.resources.tasks, spec.resources.tasks_per_node) == (3, 12, 4)


def test_tasks_that_match_tasks_per_node_times_nodes_are_accepted() -> None:
    spec = parse_job_text(MINIMAL_JOB + "[job.resources]\nnodes = 2\ntasks = 8\ntasks_per_node = 4\n")
    assert spec.resources.tasks == 8


def test_slurm_walltime_syntax_is_accepted_in_a_job() -> None:
    spec = parse_job_text(_with('time = "30m"', 'time = "1-02:03:04"'))
    assert spec.resources.time_seconds == 86400 + 2 * 3600 + 3 * 60 + 4


def test_env_may_be_written_as_a_subtable() -> None:
    spec = parse_job_text(MINIMAL_JOB + '[job.env]\nA = "1"\nB = "two"\n')
    assert dict(spec.env) == {"A": "1", "B": "two"}


def test_parsed_env_cannot_be_changed_afterwards() -> None:
    spec = parse_job_text(EXAMPLE_JOB)
    with pytest.raises(TypeError):
        spec.env["LD_PRELOAD"] = "/evil.so"  # type: ignore[index]


def test_queue_time_is_a_duration_kept_through_the_store() -> None:
    spec = parse_job_text(EXAMPLE_JOB.replace('time = "30m"', 'time = "30m"\nqueue_time = "20s"'))
    assert spec.resources.queue_seconds == 20
    assert spec_from_json(spec.to_json(), "stored").resources.queue_seconds == 20
    assert parse_job_text(EXAMPLE_JOB).resources.queue_seconds is None


def test_job_to_json_is_plain_data() -> None:
    assert parse_job_text(EXAMPLE_JOB).to_json() == {
        "name": "mpi-tests", "image": "clima-ci", "command": ["julia", "--project", "test/runtests.jl"],
        "script": None, "env": {"JULIA_NUM_THREADS": "4"}, "binds": ["/groups/esm/data:/data:ro"],
        "network": False, "mpi": True, "outputs": [],
        "setup": None, "caches": [],
        "resources": {"account": "clima", "partition": "expansion", "nodes": 2, "tasks": 8,
                      "tasks_per_node": None, "cpus_per_task": 4, "gpus": 0, "memory_mb": 16384,
                      "time_seconds": 1800, "queue_time_seconds": None},
    }


@pytest.mark.parametrize(("old", "new", "message"), [
    # counts
    ("nodes = 2", "nodes = 0", "job.toml:12: job.resources.nodes: must be at least 1, got 0"),
    ("nodes = 2", "nodes = -2", "job.toml:12: job.resources.nodes: must be at least 1, got -2"),
    ("nodes = 2", "nodes = 1000000000000",
     "job.toml:12: job.resources.nodes: must be at most 100000, got 1000000000000"),
    ("tasks = 8", "tasks = 0", "job.toml:13: job.resources.tasks: must be at least 1, got 0"),
    ("cpus_per_task = 4", "cpus_per_task = 0",
     "job.toml:14: job.resources.cpus_per_task: must be at least 1, got 0"),
    ("cpus_per_task = 4", "cpus_per_task = 5000",
     "job.toml:14: job.resources.cpus_per_task: must be at most 4096, got 5000"),
    ("gpus = 0", "gpus = -1", "job.toml:15: job.resources.gpus: must be at least 0, got -1"),
    # wrong types
    ("nodes = 2", 'nodes = "2"', "job.toml:12: job.resources.nodes: must be an integer, got a string"),
    ("nodes = 2", "nodes = 2.0", "job.toml:12: job.resources.nodes: must be an integer, got a number"),
    ("nodes = 2", "nodes = true", "job.toml:12: job.resources.nodes: must be an integer, got a boolean"),
    ("nodes = 2", "nodes = [2]", "job.toml:12: job.resources.nodes: must be an integer, got an array"),
    ("network = false", 'network = "no"', "job.toml:7: job.network: must be true or false, got a string"),
    ("enabled = true", "enabled = 1", "job.toml:20: job.mpi.enabled: must be true or false, got an integer"),
    ('account = "clima"', "account = 7",
     "job.toml:10: job.resources.account: must be a string, got an integer"),
    ('command = ["julia", "--project", "test/runtests.jl"]', 'command = "julia"',
     "job.toml:4: job.command: must be an array of strings, got a string"),
    ('command = ["julia", "--project", "test/runtests.jl"]', 'command = ["julia", 1]',
     "job.toml:4: job.command[1]: must be a string, got an integer"),
    ('env = { JULIA_NUM_THREADS = "4" }', "env = { JULIA_NUM_THREADS = 4 }",
     "job.toml:5: job.env.JULIA_NUM_THREADS: must be a string, got an integer"),
    ('env = { JULIA_NUM_THREADS = "4" }', 'env = "JULIA_NUM_THREADS=4"',
     "job.toml:5: job.env: must be a table of strings, got a string"),
    ('binds = ["/groups/esm/data:/data:ro"]', 'binds = "/groups/esm/data"',
     "job.toml:6: job.binds: must be an array of strings, got a string"),
    # task layout
    ("tasks = 8", "tasks = 1",
     "job.toml:13: job.resources.tasks: 1 task(s) cannot fill 2 nodes (each node needs at least one task)"),
    ("cpus_per_task = 4", "tasks_per_node = 3",
     "job.toml:13: job.resources.tasks: 8 tasks cannot be spread as 3 per node over 2 node(s) (that is 6)"),
    # units
    ('memory = "16G"', 'memory = "16"',
     "job.toml:16: job.resources.memory: '16' is not a memory size (use \"512M\" or \"16G\")"),
    ('memory = "16G"', "memory = 16",
     "job.toml:16: job.resources.memory: must be a size such as \"512M\" or \"16G\", got 16"),
    ('time = "30m"', 'time = "0m"', "job.toml:17: job.resources.time: '0m' must be longer than zero"),
    ('time = "30m"', 'time = "forever"',
     "job.toml:17: job.resources.time: 'forever' is not a duration "
     "(use \"90s\", \"30m\", \"4h\" or \"D-HH:MM:SS\")"),
    # names
    ('name = "mpi-tests"', 'name = "mpi tests!"',
     "job.toml:2: job.name: 'mpi tests!' is not a job name (letters, digits, '.', '_', '-'; at most 64)"),
    ('name = "mpi-tests"', f'name = "{"n" * 65}"', "job.toml:2: job.name: 'nnnn"),
    ('image = "clima-ci"', 'image = "../clima-ci"',
     "job.toml:3: job.image: '../clima-ci' is not an image name from the policy's catalogue"),
    ('partition = "expansion"', 'partition = "a b"',
     "job.toml:11: job.resources.partition: 'a b' is not a partition name"),
    # required, exclusive
    ('image = "clima-ci"', "# no image", "job.toml:1: job.image: is required"),
    ('command = ["julia", "--project", "test/runtests.jl"]', "# no command",
     "job.toml:1: job: needs either `command` (an array) or `script` (a string)"),
    ("network = false", 'script = "make test"',
     "job.toml:7: job.script: give either `command` or `script`, not both"),
    ('command = ["julia", "--project", "test/runtests.jl"]', "command = []",
     "job.toml:4: job.command: must not be empty"),
    # unknown keys
    ("network = false", "networks = false",
     "job.toml:7: job.networks: unknown key (known keys here: binds, caches, command, env, image, mpi, name, "
     "network, outputs, resources, script, setup)"),
    ("gpus = 0", "gpu = 0",
     "job.toml:15: job.resources.gpu: unknown key (known keys here: account, cpus_per_task, gpus, memory, "
     "nodes, partition, queue_time, tasks, tasks_per_node, time)"),
    ("enabled = true", "enable = true",
     "job.toml:20: job.mpi.enable: unknown key (known keys here: enabled, launch)"),
    ("[job.mpi]", "[job.mpich]", "job.toml:19: job.mpich: unknown key"),
    # binds
    ('binds = ["/groups/esm/data:/data:ro"]', 'binds = ["/proc:/proc"]',
     "job.toml:6: job.binds[0]: bind '/proc:/proc': the source must not be /proc or below it"),
    ('binds = ["/groups/esm/data:/data:ro"]', 'binds = ["/a:/data:ro", "/b:/data:ro"]',
     "job.toml:6: job.binds[1]: two binds mount onto /data"),
    ('binds = ["/groups/esm/data:/data:ro"]', 'binds = ["/a:/data", "/a:/data"]',
     "job.toml:6: job.binds[1]: '/a:/data' is listed twice"),
    ('binds = ["/groups/esm/data:/data:ro"]', 'binds = ["/groups/esm/data:/work"]',
     "job.toml:6: job.binds[0]: bind '/groups/esm/data:/work': the target /work is reserved for the runner"),
])
def test_invalid_job_names_file_line_and_field(old: str, new: str, message: str) -> None:
    assert str(_error(_with(old, new))).startswith(message)


@pytest.mark.parametrize("name", [
    "SLURM_NTASKS", "SLURM_JOB_ID", "PMIX_RANK", "PMI_SIZE", "APPTAINER_BIND", "APPTAINERENV_PATH",
    "SINGULARITY_BIND", "SINGULARITYENV_LD_PRELOAD", "HPC_RUNNER_TOKEN", "LD_PRELOAD", "LD_AUDIT",
])
def test_reserved_environment_names_are_refused(name: str) -> None:
    error = _error(_with('env = { JULIA_NUM_THREADS = "4" }', f'env = {{ {name} = "x" }}'))
    assert str(error) == (f"job.toml:5: job.env.{name}: {name} is reserved for the runner "
                          "and the MPI launcher")


@pytest.mark.parametrize("name", ["1BAD", "A-B", "A.B", "A B", ""])
def test_environment_names_must_be_shell_identifiers(name: str) -> None:
    error = _error(_with('env = { JULIA_NUM_THREADS = "4" }', f'env = {{ "{name}" = "x" }}'))
    assert str(error) == f"job.toml:5: job.env.{name}: {name!r} is not an environment variable name"


def test_env_names_close_to_reserved_ones_are_allowed() -> None:
    text = _with('env = { JULIA_NUM_THREADS = "4" }', 'env = { MY_SLURM_X = "1", slurm_x = "2" }')
    spec = parse_job_text(text)
    assert dict(spec.env) == {"MY_SLURM_X": "1", "slurm_x": "2"}


def test_job_keys_outside_a_job_table_are_reported_as_a_missing_job_table() -> None:
    assert str(_error('name = "x"\n')) == "job.toml: job: is required"


def test_a_file_without_a_job_table_says_the_table_is_required() -> None:
    assert str(_error("# empty\n")) == "job.toml: job: is required"


def test_unknown_top_level_table_is_reported_at_its_header() -> None:
    assert str(_error(MINIMAL_JOB + "\n[jobs]\nx = 1\n")) == \
        "job.toml:6: jobs: unknown key (known keys here: job)"


@pytest.mark.parametrize(("table", "message"), [
    ("resources = 4", "job.toml:5: job.resources: must be a table, got an integer"),
    ("mpi = true", "job.toml:5: job.mpi: must be a table, got a boolean"),
])
def test_tables_given_as_scalars_are_reported(table: str, message: str) -> None:
    assert str(_error(MINIMAL_JOB + table + "\n")) == message


def test_script_must_not_be_blank() -> None:
    assert str(_error(_with('command = ["true"]', 'script = "  \\n"', MINIMAL_JOB))) == \
        "job.toml:4: job.script: must not be empty"


def test_script_must_be_a_string() -> None:
    assert str(_error(_with('command = ["true"]', "script = [\"make\"]", MINIMAL_JOB))) == \
        "job.toml:4: job.script: must be a string"


def test_oversized_script_is_refused() -> None:
    text = _with('command = ["true"]', f'script = "{"x" * (256 * 1024 + 1)}"', MINIMAL_JOB)
    assert str(_error(text)) == "job.toml:4: job.script: is longer than 262144 bytes"


def test_nul_characters_in_arguments_are_refused() -> None:
    text = _with('command = ["true"]', 'command = ["a\\u0000b"]', MINIMAL_JOB)
    assert str(_error(text)) == "job.toml:4: job.command[0]: contains a NUL character"


def test_overlong_strings_are_refused() -> None:
    text = _with('command = ["true"]', f'command = ["{"a" * 5000}"]', MINIMAL_JOB)
    assert str(_error(text)) == "job.toml:4: job.command[0]: is longer than 4096 characters"


def test_overlong_lists_are_refused() -> None:
    text = _with('command = ["true"]', "command = [" + ", ".join(['"a"'] * 1025) + "]", MINIMAL_JOB)
    assert str(_error(text)) == "job.toml:4: job.command: has more than 1024 entries"


# --- line numbers in less simple layouts ----------------------------------------------------------

def test_toml_syntax_error_gives_its_line() -> None:
    error = _error(_with("nodes = 2", "nodes = "))
    assert (error.file, error.line) == ("job.toml", 12)
    assert str(error).startswith("job.toml:12: invalid TOML: ")


def test_duplicate_key_is_a_syntax_error_with_its_line() -> None:
    error = _error(_with("gpus = 0", "nodes = 3"))
    assert str(error).startswith("job.toml:15: invalid TOML: ")


def test_line_of_a_field_set_in_an_inline_resources_table() -> None:
    text = MINIMAL_JOB + "network = false\nresources = { nodes = 1, gpus = -1 }\n"
    assert str(_error(text)) == "job.toml:6: job.resources.gpus: must be at least 0, got -1"


def test_line_of_a_field_set_with_a_dotted_key() -> None:
    text = MINIMAL_JOB + "network = false\nresources.nodes = 0\n"
    assert str(_error(text)) == "job.toml:6: job.resources.nodes: must be at least 1, got 0"


def test_line_of_an_element_of_a_multiline_array() -> None:
    text = _with('command = ["true"]', 'command = [\n  "julia",\n  "--project",\n  7,\n]', MINIMAL_JOB)
    assert str(_error(text)) == "job.toml:7: job.command[2]: must be a string, got an integer"


def test_line_of_an_env_entry_in_a_subtable() -> None:
    text = MINIMAL_JOB + '[job.env]\nA = "1"\nLD_PRELOAD = "/x.so"\n'
    assert str(_error(text)) == \
        "job.toml:7: job.env.LD_PRELOAD: LD_PRELOAD is reserved for the runner and the MPI launcher"


def test_lines_inside_a_multiline_script_are_not_taken_for_headers_or_keys() -> None:
    script = 'script = """\ncat > setup.cfg <<EOF\n[metadata]\nnetwork = true\nEOF\n"""'
    text = _with('command = ["true"]', script, MINIMAL_JOB) + "network = 5\n"
    assert str(_error(text)) == "job.toml:10: job.network: must be true or false, got an integer"


def test_lines_inside_a_literal_multiline_script_are_not_taken_for_headers_or_keys() -> None:
    script = "script = '''\n[job.resources]\nnodes = 1\n'''"
    text = _with('command = ["true"]', script, MINIMAL_JOB) + "[job.resources]\nnodes = 0\n"
    assert str(_error(text)) == "job.toml:9: job.resources.nodes: must be at least 1, got 0"


def test_lines_after_a_string_with_escaped_quotes_keep_their_numbers() -> None:
    text = MINIMAL_JOB + 'env = { A = "x\\" = [", B = "}" }\nnetwork = "yes"\n'
    assert str(_error(text)) == "job.toml:6: job.network: must be true or false, got a string"


def test_comments_that_look_like_keys_do_not_move_lines() -> None:
    text = MINIMAL_JOB + "# network = false\n[job.resources]  # nodes = 1\nnodes = 0\n"
    assert str(_error(text)) == "job.toml:7: job.resources.nodes: must be at least 1, got 0"


def test_quoted_keys_are_placed_on_their_line() -> None:
    text = MINIMAL_JOB + '[job.resources]\n"nodes" = 2\n\'gpus\' = -3\n'
    assert str(_error(text)) == "job.toml:7: job.resources.gpus: must be at least 0, got -3"


# --- hostile input --------------------------------------------------------------------------------

def test_a_two_megabyte_job_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(MINIMAL_JOB + "# " + "x" * (2 * 1024 * 1024) + "\n")
    with pytest.raises(InputError) as caught:
        load_job(path)
    assert str(caught.value) == f"{path}: file is larger than 1048576 bytes"


def test_a_job_file_that_is_a_symlink_to_an_endless_device_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.symlink_to("/dev/zero")
    with pytest.raises(InputError) as caught:
        load_job(path)
    assert str(caught.value) == f"{path}: file is larger than 1048576 bytes"


def test_a_two_megabyte_job_text_is_refused() -> None:
    assert str(_error(MINIMAL_JOB + "#" * (2 * 1024 * 1024))) == "job.toml: file is larger than 1048576 bytes"


def test_an_integer_of_thousands_of_digits_is_refused_with_its_line() -> None:
    error = _error(_with("nodes = 2", "nodes = " + "9" * 5000))
    assert str(error) == "job.toml:12: invalid TOML: a number has too many digits"


def test_deeply_nested_arrays_are_refused() -> None:
    text = MINIMAL_JOB + "x = " + "[" * 100_000 + "]" * 100_000 + "\n"
    assert str(_error(text)) == ("job.toml:5: invalid TOML: arrays or tables nested too deeply "
                                 f"(more than {MAX_NESTING} levels)")


def test_deeply_nested_inline_tables_are_refused_with_their_line() -> None:
    text = MINIMAL_JOB + "x = " + "{a = " * (MAX_NESTING + 1) + "1" + "}" * (MAX_NESTING + 1) + "\n"
    assert str(_error(text)) == ("job.toml:5: invalid TOML: arrays or tables nested too deeply "
                                 f"(more than {MAX_NESTING} levels)")


# tomllib's and the line indexer's work on a dotted key grows with the square of its parts: this
# 60 KB line held the agent for 21 s. It is refused before either of them sees it.
THIRTY_THOUSAND_PARTS = ".".join(["x"] * 30_000) + " = 1\n"
TOO_MANY_PARTS = (f"invalid TOML: a key has more than {MAX_KEY_PARTS} dotted parts, "
                  "its table's name included")


def test_a_key_of_thirty_thousand_dotted_parts_is_refused_naming_the_limit() -> None:
    assert str(_error(THIRTY_THOUSAND_PARTS)) == f"job.toml:1: {TOO_MANY_PARTS}"
    assert str(_error(MINIMAL_JOB + '"q" . ' * 30_000 + "x = 1\n")) == f"job.toml:5: {TOO_MANY_PARTS}"


def test_a_table_name_of_too_many_parts_is_refused() -> None:
    header = "[" + ".".join(["t"] * (MAX_KEY_PARTS + 1)) + "]\n"
    assert str(_error(MINIMAL_JOB + header)) == f"job.toml:5: {TOO_MANY_PARTS}"
    assert str(_error(MINIMAL_JOB + "[" + header)) == f"job.toml:5: {TOO_MANY_PARTS}"


def test_a_dotted_key_counts_the_parts_of_its_tables_name() -> None:
    half = MAX_KEY_PARTS // 2
    table = "[" + ".".join(f"t{i}" for i in range(half)) + "]\n"
    key = ".".join(f"k{i}" for i in range(MAX_KEY_PARTS - half))
    assert parse_toml(table + key + " = 1\n", "a.toml").data  # exactly at the limit
    with pytest.raises(InputError) as caught:
        parse_toml(table + "# a comment\n" + key + ".one_more = 1\n", "a.toml")
    assert str(caught.value) == f"a.toml:3: {TOO_MANY_PARTS}"


def test_a_key_inside_an_inline_table_is_bounded_too() -> None:
    key = ".".join(["k"] * (MAX_KEY_PARTS + 1))
    assert str(_error(MINIMAL_JOB + f"env = {{ {key} = 1 }}\n")) == f"job.toml:5: {TOO_MANY_PARTS}"


def test_dots_and_brackets_in_strings_comments_and_values_are_neither_keys_nor_nesting() -> None:
    dots = ".".join(["d"] * 40)
    brackets = "[" * 40 + "{" * 40
    text = "\n".join([
        f'"{dots}" = 1',                                   # one quoted key with dots in it
        f"'{dots}.literal' = 2",
        f'basic = "{dots} {brackets} \\" {dots}"',
        f"literal = '{dots} {brackets}'",
        f'multi = """\n{dots}\n[{dots}]\n{brackets} \\""" {dots}\n""""',  # a quote right before the end
        f"multi_literal = '''\n{dots} = 1\n{brackets}\n'''''",
        f"# {dots} = {brackets}",
        f"float = 6.626e-34  # {dots}",
        "date = 1979-05-27T07:32:00.999999-07:00",
        "mixed = [ 1.5, 'x.y', { a.b = 2.5 }, " + "[" * (MAX_NESTING - 1) + "1" + "]" * MAX_NESTING,
        "[[" + ".".join(["t"] * (MAX_KEY_PARTS - 1)) + "]]",
        "x = 1",                                           # the 16th part, with its table's
        "",
    ])
    assert parse_toml(text, "a.toml").data == tomllib.loads(text)


def test_a_missing_job_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(InputError) as caught:
        load_job(tmp_path / "nope.toml")
    assert str(caught.value) == f"{tmp_path / 'nope.toml'}: no such file"


def test_a_directory_is_not_a_job_file(tmp_path: Path) -> None:
    with pytest.raises(InputError) as caught:
        load_job(tmp_path)
    assert str(caught.value) == f"{tmp_path}: is a directory, not a file"


def test_a_binary_job_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_bytes(b"[job]\nname = \"\xff\xfe\"\n")
    with pytest.raises(InputError) as caught:
        load_job(path)
    assert str(caught.value) == f"{path}: not UTF-8 text"


def test_load_job_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(_with("nodes = 2", "nodes = 0"))
    with pytest.raises(InputError) as caught:
        load_job(path)
    assert str(caught.value) == f"{path}:12: job.resources.nodes: must be at least 1, got 0"


# --- job tables that arrive as data (plugin blocks, [[jobs]] entries) -----------------------------

def test_parse_job_mapping_reads_a_plugin_block() -> None:
    spec = parse_job_mapping({"name": "x", "image": "i", "command": ["a"], "resources": {"nodes": 2}},
                             "pipeline.yml")
    assert (spec.name, spec.resources.nodes) == ("x", 2)


def test_parse_job_mapping_names_the_source_and_field() -> None:
    with pytest.raises(InputError) as caught:
        parse_job_mapping({"name": "x", "image": "i", "command": ["a"], "resources": {"nodes": 0}},
                          "pipeline.yml")
    assert str(caught.value) == "pipeline.yml: job.resources.nodes: must be at least 1, got 0"


def test_parse_job_mapping_refuses_what_is_not_a_table() -> None:
    with pytest.raises(InputError) as caught:
        parse_job_mapping(["name", "x"], "pipeline.yml")  # type: ignore[arg-type]
    assert str(caught.value) == "pipeline.yml: the job must be a table"
