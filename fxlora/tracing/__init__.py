"""Capturing modules as graphs: the tracer and call patterns (`traced`), proxies that carry what a
call pattern fixes (`proxies`), the probe run that sees how modules are really called (`probe`),
library integrations (`integrations`), and the thread that traces (`threads`)."""
