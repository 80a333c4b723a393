"""`workbench` command line. Options of `capture` and `run <analysis>` are generated from the config
dataclasses, and their help text from the docstrings under each field."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

import click

from workbench import analysis, api, checks, manage, sites
from workbench.capture_config import CaptureConfig
from workbench.data import DataSourceError
from workbench.models import ModelNotAvailableError
from workbench.sites import UnknownSiteError


def _user_errors() -> tuple[type[BaseException], ...]:
    """Error classes printed as one line. The cache's and the store's are looked up only if their
    module was imported (it raised them then): importing them here would load torch for `--help`."""
    errors = [ModelNotAvailableError, UnknownSiteError, DataSourceError, ValueError, KeyError]
    for module, name in (("workbench.cache", "CorruptEntryError"), ("workbench.store", "StoreError")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def _options_from(config_cls: type) -> list[click.Option]:
    docs = analysis.field_docs(config_cls)
    hints = typing.get_type_hints(config_cls)
    options = []
    for f in dataclasses.fields(config_cls):
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if hint is bool:
            options.append(
                click.Option(
                    [f"{flag}/--no-{f.name.replace('_', '-')}"], default=default, help=docs.get(f.name)
                )
            )
            continue
        if typing.get_origin(hint) is tuple:
            default = ",".join(default)
            hint = str
        allowed = checks.choices(hint)
        options.append(
            click.Option(
                [flag],
                type=click.Choice(allowed) if allowed else hint if hint in (int, float, str) else str,
                default=default,
                show_default=True,
                help=docs.get(f.name),
            )
        )
    return options


def _print_rows(rows: list[dict], columns: list[str] | None = None) -> None:
    if not rows:
        click.echo("(none)")
        return
    columns = columns or list(rows[0])
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _guard(fn):
    """Turn known user errors into one readable line and exit code 2, never a traceback."""

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except _user_errors() as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            click.echo(f"error: {message}", err=True)
            sys.exit(2)

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


class Workbench(click.Group):
    """Top-level group: any registered analysis also works as a command (`workbench train-sae ...`)."""

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return super().get_command(ctx, name) or RUN.get_command(ctx, name)


@click.group(cls=Workbench, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--device",
    default=None,
    help="Where models, dictionaries (training and evaluation) and patching run: cpu, cuda or cuda:N "
    "(default: CUDA when torch sees a GPU, else cpu).",
)
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "bf16", "fp16"]),
    default=None,
    help="Model weights' dtype (default fp32). fp16 is GPU-only; a non-fp32 model gets its own stores and "
    "cache keys (its activations differ).",
)
def cli(device: str | None, dtype: str | None) -> None:
    """Mechanistic interpretability workbench: capture activations, run analyses, browse results."""
    if device or dtype:
        _use_device(device, dtype)


@_guard
def _use_device(device: str | None, dtype: str | None) -> None:
    """Check --device/--dtype before any work and hand them to every model load of this process."""
    from workbench.models import resolve_device, resolve_dtype

    resolved = resolve_device(device)
    resolve_dtype(dtype, resolved.split(":")[0])
    os.environ["WORKBENCH_DEVICE"] = resolved
    if dtype:
        os.environ["WORKBENCH_DTYPE"] = dtype


@cli.command("models")
def models_cmd() -> None:
    """List model keys and where each comes from."""
    _print_rows(api.list_models())


@cli.command("stores")
def stores_cmd() -> None:
    """List activation stores with provenance and size."""
    _print_rows(api.list_stores())


@cli.command("verify")
@click.argument("store")
@_guard
def verify_cmd(store: str) -> None:
    """Check every shard of a store against its checksum (damaged shards are set aside, and the
    same capture command rewrites them)."""
    from workbench.store import ActivationStore, StoreError, resolve_store

    opened = ActivationStore(resolve_store(store))
    damaged = opened.verify()
    n = sum(opened.n_shards(site) for site in opened.sites)
    if damaged:
        raise StoreError(
            f"{len(damaged)} of {n} shards in {opened.root} are damaged ({', '.join(damaged)}); "
            "re-run the same capture command to rewrite them"
        )
    click.echo(f"ok: {n} shards verified" + ("" if opened.complete else " (the capture is not complete)"))


@cli.command("list")
def list_cmd() -> None:
    """List registered analyses."""
    _print_rows(api.list_analyses())


@cli.command("results")
@click.option("--analysis", default=None, help="Only this analysis.")
@click.option("--search", default=None, help="Substring of the config, analysis or model.")
@click.option("--reindex", is_flag=True, help="Rebuild the results index from the entry folders first.")
def results_cmd(analysis: str | None, search: str | None, reindex: bool) -> None:
    """List cached results, newest first, with what each was computed from (store, site, options
    that differ from the defaults)."""
    if reindex:
        click.echo(f"indexed {api.cache().reindex()} cached results")
    _print_rows(api.results_table(analysis, search))


@cli.command("rm")
@click.argument("key")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_guard
def rm_cmd(key: str, yes: bool) -> None:
    """Delete a cached result (a unique key prefix is enough)."""
    row = manage.find_result(key, api.cache())
    if not yes:
        click.confirm(f"delete result {row['key'][:16]} ({row['analysis']})?", abort=True)
    api.delete_result(row["key"])
    click.echo(f"deleted result {row['key'][:16]} ({row['analysis']})")


@cli.command("rm-store")
@click.argument("store")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@_guard
def rm_store_cmd(store: str, yes: bool) -> None:
    """Delete an activation store, by path or by the id `workbench stores` lists."""
    root = manage.resolve_existing_store(store)
    if not yes:
        click.confirm(f"delete store {root}?", abort=True)
    root, left = api.delete_store(str(root))
    kept = f"; kept files that are not the store's: {', '.join(left)}" if left else ""
    click.echo(f"deleted store {root}{kept}")


def _report(result, html: str | None) -> None:
    _print_rows(result.summary())
    click.echo(f"cached as {result.cache_key}")
    if html:
        _write_html(result, Path(html))
        click.echo(f"figures written to {html}")


def _write_html(result, path: Path) -> None:
    parts = [
        fig.to_html(full_html=False, include_plotlyjs=not i, default_height=480)
        for i, fig in enumerate(result.figures().values())
    ]
    path.write_text("<html><body>" + "\n".join(parts) + "</body></html>")


@cli.command("show")
@click.argument("key")
@click.option("--html", default=None, help="Write the result's figures to this HTML file.")
@click.option(
    "--json", "as_json", is_flag=True, help="Print every plain (non-tensor) field of the result as JSON."
)
@_guard
def show_cmd(key: str, html: str | None, as_json: bool) -> None:
    """Show a cached result by key (a unique prefix is enough)."""
    result = api.load(_unique_key(key))
    if as_json:
        click.echo(json.dumps(result.to_payload()[0]["fields"], default=str, indent=2))
    else:
        _report(result, html)


@cli.command("export")
@click.argument("key")
@click.argument("path")
@click.option("--model-id", default="", help="Neuronpedia model id (default: the result's model key).")
@click.option("--source-set", default="", help="Neuronpedia source-set name (default: neurons / dictionary).")
@_guard
def export_cmd(key: str, path: str, model_id: str, source_set: str) -> None:
    """Export a cached result in its interchange format (dashboards: a folder of SAEDashboard batch-N.json files)."""
    result = api.load(_unique_key(key))
    if not hasattr(result, "export"):
        raise ValueError(f"{type(result).__name__} has no export format")
    click.echo(f"written {result.export(path, model_id=model_id, source_set=source_set)}")


def _unique_key(prefix: str) -> str:
    return api.cache().resolve(prefix)


def _engine_options(unit: str, workers: bool = True) -> list[click.Option]:
    """--engine/--address (and --workers): do `unit` as Ray jobs (workbench.distributed)."""
    options = [
        click.Option(
            ["--engine"],
            type=click.Choice(api.ENGINES),
            default="local",
            show_default=True,
            help=f"'ray': {unit} as Ray jobs (on a filesystem every node mounts).",
        ),
        click.Option(
            ["--address"],
            default=None,
            help="Ray cluster address (host:port or 'auto'); default: start Ray on this machine.",
        ),
    ]
    if workers:
        options.append(
            click.Option(
                ["--workers"], type=int, default=2, show_default=True, help="Ray workers (one CPU each)."
            )
        )
    return options


def _capture_command() -> click.Command:
    @_guard
    def callback(out: str | None, engine: str, address: str | None, workers: int, **kwargs):
        kwargs["sites"] = tuple(sites.split_patterns(kwargs["sites"]))  # commas inside {a,b} stay
        store = api.capture(out=out, engine=engine, address=address, workers=workers, **kwargs)
        click.echo(f"store: {store.root}  ({store.n_rows} rows, {len(store.sites)} sites)")

    params = _options_from(CaptureConfig) + [
        click.Option(
            ["--out"],
            default=None,
            help="Store folder (default: content-addressed under $WORKBENCH_HOME/stores).",
        ),
        *_engine_options("write the shards"),
    ]
    return click.Command(
        "capture",
        callback=callback,
        params=params,
        help="Capture activations at hook sites to an activation store (resumable).",
    )


class RunGroup(click.Group):
    """`workbench run <analysis> [options]`: one subcommand per registered analysis."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [s.name for s in analysis.all_specs()]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        try:
            spec = analysis.get(name)
        except KeyError:
            return None

        @_guard
        def callback(
            force: bool,
            html: str | None,
            as_json: bool,
            preset: str | None,
            engine: str,
            address: str | None,
            **kwargs,
        ):
            kwargs = _apply_preset(spec.name, preset, kwargs)
            ctx = click.get_current_context()
            typed = {
                k for k in kwargs if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE
            }
            result = api.run(spec.name, force=force, explicit=typed, engine=engine, address=address, **kwargs)
            if as_json:
                click.echo(json.dumps(result.summary(), default=str, indent=2))
            else:
                _report(result, html)

        extra = [
            click.Option(["--force"], is_flag=True, help="Recompute even if cached."),
            click.Option(["--html"], default=None, help="Write the figures to this HTML file."),
            click.Option(["--json", "as_json"], is_flag=True, help="Print the summary as JSON."),
            click.Option(
                ["--preset"],
                default=None,
                help="JSON file of option values (data/presets/); explicit options win.",
            ),
            *_engine_options("compute the per-shard maps (activation-stats)", workers=False),
        ]
        return click.Command(
            name, callback=callback, params=_options_from(spec.config_cls) + extra, help=spec.doc
        )


def _apply_preset(name: str, preset: str | None, kwargs: dict) -> dict:
    """Preset values replace defaults; options the user typed on the command line still win, and
    a store (typed or preset) replaces the preset's capture options (it was captured with its own)."""
    if not preset:
        return kwargs
    values = api.load_preset(preset, name)
    ctx = click.get_current_context()
    typed = {k for k in kwargs if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
    merged = {**kwargs, **{k: v for k, v in values.items() if k not in typed}}
    dropped = manage.superseded_fields(analysis.get(name).config_cls, merged) - typed
    return {**merged, **{k: kwargs[k] for k in dropped if k in kwargs}}


cli.add_command(_capture_command())


@cli.command("sweep")
@click.argument("analysis_name", metavar="ANALYSIS")
@click.option(
    "--vary", multiple=True, required=True, help="NAME=V1,V2,...: one run per value (several: product)."
)
@click.option("--set", "fixed", multiple=True, help="NAME=VALUE for every run (e.g. store=<path>).")
@_guard
def sweep_cmd(
    analysis_name: str, vary: tuple[str, ...], fixed: tuple[str, ...], engine: str, address: str | None
):
    """Run one analysis over a grid of options (e.g. train-sae over k and d_sae); each run is
    cached as it finishes, so `workbench results` and the app list it at once."""
    from workbench.distributed.ray_sweep import grid

    configs = grid(analysis_name, vary, fixed)
    shown = [item.partition("=")[0].strip().replace("-", "_") for item in vary]

    def done(run) -> None:
        click.echo(" ".join(f"{k}={run.overrides[k]}" for k in shown) + f"  ->  {run.key[:12]}")

    runs = api.sweep(analysis_name, configs, engine=engine, address=address, on_done=done)
    click.echo(f"sweep: {len(runs)} {analysis_name} results in the cache (workbench results {analysis_name})")


sweep_cmd.params.extend(_engine_options("run each config", workers=False))
RUN = RunGroup("run", help="Run an analysis (cached): workbench run <analysis> --help")
cli.add_command(RUN)


@cli.command("app")
@click.option("--port", default=8501, show_default=True)
@click.option(
    "--host",
    "--address",
    "address",
    default="127.0.0.1",
    show_default=True,
    help="Interface to serve on. The default serves this machine only; --host 0.0.0.0 opens the app "
    "(which reads and writes files under WORKBENCH_HOME) to the network.",
)
@click.option("--headless/--no-headless", default=True, show_default=True)
def app_cmd(port: int, address: str, headless: bool) -> None:
    """Start the Streamlit workbench in the browser."""
    # The router ships inside the package (workbench/app_pages/main.py once installed); found
    # without importing the pages, which would import streamlit into this process.
    pages = importlib.util.find_spec("workbench.app_pages")
    router = Path(pages.submodule_search_locations[0]) / "main.py"
    # No file watcher: with .venv inside the checkout it follows thousands of modules (inotify overflow).
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(router),
        "--server.port",
        str(port),
        "--server.address",
        address,
        "--server.headless",
        str(headless).lower(),
        "--server.fileWatcherType",
        "none",
        "--client.toolbarMode",
        "minimal",
        "--browser.gatherUsageStats",
        "false",
    ]
    # exec, not a child process: a terminated `workbench app` must not leave Streamlit serving.
    os.execv(sys.executable, cmd)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
