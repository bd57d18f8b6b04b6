"""The gin slips T5X users make most, each caught while parsing and told in one line that
names the fix: a command-line macro nothing reads (a typo such as TRAIN_STEP), a macro the
configuration needs and nobody set, an unquoted string, a misspelt configurable or parameter
("did you mean"). Also the run's config as gin text with real module names.

Gin keeps the parsed configuration in gin.config._CONFIG ({(scope, selector): {parameter:
value}}, macros under the selector "gin.macro"); gin has no public way to list bound or
referenced macros, so this module reads it."""
import ast
import difflib
import inspect
import re
import sys

import gin

MACRO_SELECTOR = "gin.macro"
# An example value for each macro that has no default (gin/defaults.gin).
REQUIRED_EXAMPLES = {
    "MODEL_DIR": "\"'runs/my_run'\"",
    "TRAIN_STEPS": "1000",
    "INFER_OUTPUT": "\"'predictions.jsonl'\"",
    "MIXTURE_OR_TASK_NAME": "\"'stdlib_span_corruption'\"",
}


# Names that moved, as a config.gin written before the move (or an old command line) binds
# them: the binding to write instead.
MOVED = {
    "t5x_lite.train.DataConfig": "run_config.DataConfig (from t5x_lite import run_config)",
    "t5x_lite.train.LoopConfig": "run_config.LoopConfig (from t5x_lite import run_config)",
    "partitioning.MeshConfig.rules": "partitioning.MeshConfig.rule_table = 'data', 'fsdp', "
                                     "'fsdp_tensor' or 'expert', plus rule_overrides",
}


class GinSlip(ValueError):
    """A configuration mistake, already phrased as the one line to print."""


def bound_macros() -> set[str]:
    return {scope for scope, selector in gin.config._CONFIG if selector == MACRO_SELECTOR}


def read_macros() -> set[str]:
    """Macros some binding refers to (%NAME), in any file or flag."""
    macro = gin.get_configurable(gin.config.macro)
    return {reference.config_key[0] for reference in
            gin.config.iterate_references(gin.config._CONFIG, to=macro)}


def closest(name: str, candidates) -> str:
    """' (did you mean X?)' for the candidate closest to `name`, or ''."""
    matches = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return f" (did you mean {matches[0]}?)" if matches else ""


def binding_name(binding: str) -> str:
    return binding.split("=", 1)[0].strip()


def check_macros(command_line_bindings: list[str], known_macros: set[str]) -> None:
    """A macro set on the command line that no binding reads and no gin file sets (a typo:
    `known_macros` are those the files, gin/defaults.gin included, set), or a macro read and
    never set, is a GinSlip naming the macro the user probably meant / the flag to pass. A
    known macro this entry point does not read (TRAIN_STEPS given to eval) is ignored, so one
    list of flags serves train, eval and infer."""
    bound, read = bound_macros(), read_macros()
    known = read | known_macros | set(REQUIRED_EXAMPLES)
    for binding in command_line_bindings:
        name = binding_name(binding)
        if re.fullmatch(r"[A-Za-z_]\w*", name) and name not in known:
            raise GinSlip(f"--gin.{name}: no gin file reads the macro {name}"
                          f"{closest(name, known)}; gin/defaults.gin lists the macros")
    for name in sorted(read - bound):
        example = REQUIRED_EXAMPLES.get(name, "VALUE")
        raise GinSlip(f"{name} is not set: pass --gin.{name}={example} (or set it in a gin "
                      "file)")


def explain(error: Exception) -> str:
    """One line for an error gin raised while parsing, with the fix where one is known."""
    if isinstance(error, GinSlip):
        return str(error)
    if isinstance(error, SyntaxError) and hasattr(error.args[-1], "line_content"):  # gin's
        return _syntax_error_line(error)
    if isinstance(error, SyntaxError):  # in a Python module a gin file imports
        return f"{error.filename}:{error.lineno}: Python syntax error: {error.msg}"
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    where = _location(text)
    parameter = re.match(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'",
                         first)
    if parameter:
        selector, name = parameter.groups()
        target = _resolve(selector)
        known = inspect.signature(target).parameters if target is not None else ()
        return (f"{where}{selector} has no parameter {name!r}"
                f"{_moved(f'{selector}.{name}') or closest(name, known)}")
    attribute = re.match(r"Couldn't resolve selector ([\w.]+); <module '([\w.]+)'.*has no "
                         r"attribute (\w+)", first)
    if attribute:
        selector, module, name = attribute.groups()
        public = [n for n in dir(sys.modules.get(module)) if not n.startswith("_")]
        return (f"{where}{selector}: {module} has no {name!r}"
                f"{_moved(selector) or closest(name, public)}")
    return f"bad gin configuration: {where}{first}"


def _moved(selector: str) -> str:
    """'; it moved: bind X' for a name in MOVED (matched by its last components), or ''."""
    parts = selector.split(".")
    for old, new in MOVED.items():
        if len(parts) > 1 and old.split(".")[-len(parts):] == parts:
            return f"; it moved: bind {new} (edit that line of an older config.gin)"
    return ""


def _location(text: str) -> str:
    """'FILE:LINE: ' or 'the binding \"...\": ' from a gin error message, or ''."""
    in_file = re.search(r'In file "([^"]+)", line (\d+)', text)
    if in_file:
        return f"{in_file.group(1)}:{in_file.group(2)}: "
    in_bindings = re.search(r"In bindings string line \d+\n\s*(.+)", text)
    return f"--gin.{in_bindings.group(1).replace(' ', '')}: " if in_bindings else ""


def _syntax_error_line(error: SyntaxError) -> str:
    location = error.args[1]
    line = (location.line_content or "").strip()
    name, _, value = (part.strip() for part in line.partition("="))
    unquoted = (value and not value.startswith(("@", "%", "'", '"'))
                and re.fullmatch(r"[\w./:~+-]+", value) and not _is_literal(value))
    if location.filename is None:  # a command-line binding
        if unquoted:
            return (f"--gin.{name}={value}: a string value needs quotes, which the shell "
                    f"removes unless quoted twice: pass --gin.{name}=\"'{value}'\"")
        return f"--gin.{name}={value}: not a gin value ({error.args[0].splitlines()[0]})"
    where = f"{location.filename}:{location.line_num}"
    if unquoted:
        return f"{where}: a string value needs quotes: {name} = '{value}'"
    return f"{where}: bad gin syntax in {line!r} ({error.args[0].splitlines()[0]})"


def _is_literal(value: str) -> bool:
    try:
        ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return False
    return True


def _resolve(selector: str):
    """The object a dotted gin selector such as 'models.T5Config' names, looked up among the
    loaded modules (gin files import them by their last components), or None."""
    parts = selector.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        for name, module in list(sys.modules.items()):
            if name == module_name or name.endswith("." + module_name):
                target = module
                try:
                    for attribute in parts[split:]:
                        target = getattr(target, attribute)
                except AttributeError:
                    continue
                return target
    return None


def config_text() -> str:
    """gin.config_str() with the real module names: gin aliases each `import a.b` after the
    first that binds `a` (`import t5x_lite.train as t5x_lite3`); the plain import binds the
    same attribute path, so the alias is spelt out again. The text parses back to the same
    configuration."""
    text = gin.config_str()
    for module, alias in re.findall(r"^import ([\w.]+) as (\w+)$", text, re.MULTILINE):
        text = re.sub(rf"^import {re.escape(module)} as {alias}$", f"import {module}", text,
                      flags=re.MULTILINE)
        text = re.sub(rf"(?<![\w.]){alias}\.", f"{module}.", text)
    return text
