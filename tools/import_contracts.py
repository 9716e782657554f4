"""Import-linter contract types of this repository; `.importlinter` names them under `contract_types`.

`acyclic_modules`: no import cycle among the modules of the given packages. Every import statement counts, those
inside functions included (grimp reads them all), and a package's `__init__` is a module like any other: import-linter's
own `acyclic_siblings` compares the children of a package with each other, so a cycle through a package's `__init__`
would pass it.
"""

from __future__ import annotations

import grimp
from importlinter import Contract, ContractCheck, fields, output


class AcyclicModulesContract(Contract):
    type_name = "acyclic_modules"

    containers = fields.ListField(subfield=fields.StringField())

    def check(self, graph: grimp.ImportGraph, verbose: bool) -> ContractCheck:
        modules = set()
        for container in self.containers:  # type: ignore[attr-defined]
            modules |= {container, *graph.find_descendants(container)}
        cycles = []
        for component in strongly_connected(graph, modules):
            cycle = one_cycle(graph, component)
            cycles.append(
                [
                    (
                        importer,
                        imported,
                        sorted(
                            d["line_number"] for d in graph.get_import_details(importer=importer, imported=imported)
                        ),
                    )
                    for importer, imported in zip(cycle, cycle[1:] + cycle[:1], strict=True)
                ]
            )
        return ContractCheck(kept=not cycles, warnings=[], metadata={"cycles": cycles})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for cycle in check.metadata["cycles"]:
            output.print_error(f"Import cycle through {len(cycle)} modules:")
            for importer, imported, lines in cycle:
                output.print_error(f"  {importer} -> {imported} (line {', '.join(map(str, lines))})", bold=False)
            output.new_line()


def strongly_connected(graph: grimp.ImportGraph, modules: set[str]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module) & modules):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(modules):
        if module not in index:
            visit(module)
    return sorted(found)


def one_cycle(graph: grimp.ImportGraph, component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module (what to break; other cycles may share the component)."""
    start = component[0]
    best: tuple[str, ...] | None = None
    for imported in sorted(graph.find_modules_directly_imported_by(start) & set(component)):
        chain = graph.find_shortest_chain(imported, start)
        if chain is not None and (best is None or len(chain) < len(best)):
            best = chain
    assert best is not None, component
    return [start, *best[:-1]]
