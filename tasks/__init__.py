# Stage config sections import Section from esvr.flows.config, which composes them: load it first
# so that importing any esvr.tasks module first cannot hit a half-initialized config.
import esvr.flows.config  # noqa: E402,F401
