"""The MI commands, one module per domain, on one control plane (`Control`, table.py).

- base.py: the declarations (`Command`, `Param`), parameter parsers, binding, shared state;
- live_config.py: acm_set, acm_reload, E_ACM_RELOAD, acm_log_level, acm_get_config;
- lists.py: the whitelist and the block list;
- gateways.py: the carrier registry (carriers, gateways, routes);
- stats.py: acm_stats;
- history.py: acm_alert_list, acm_audit_list;
- table.py: the command table, authorisation and dispatch (`which` too).

Commands change desired state in the store; the workers apply it. Another room adds commands
with a `CommandFactory` that cli.py hands to `Control(..., extra_commands=...)`.
"""

from acm_module.control.commands.base import (
    EVENT_RELOAD,
    Command,
    CommandFactory,
    Param,
    open_repository,
)
from acm_module.control.commands.table import Control, Reply

__all__ = ["EVENT_RELOAD", "Command", "CommandFactory", "Control", "Param", "Reply",
           "open_repository"]
