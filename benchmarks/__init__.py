"""Benchmarks of SOAP serving. Each script is a module run from the repository root, `python -m benchmarks.NAME`;
`benchmarks.harness` is what they share with each other and with the tests (servers, load, CPU accounting)."""
