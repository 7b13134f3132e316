"""Topic ACL plugin for amqtt 0.12.1, fed from :mod:`broker.identities`.

amqtt's own ``TopicAccessControlListPlugin`` can check publish, subscribe and
receive, but its config dataclass only declares ``publish_acl`` and the
deprecated ``acl``: with the recommended ``plugins:`` config (validated
strictly) neither ``subscribe-acl`` nor ``receive-acl`` can be set, so a
subscriber would never be re-checked at delivery. This plugin declares all
three tables, reuses amqtt's pattern matcher, and denies whatever is not
listed (including an empty table, which amqtt reads as "filtering off").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from amqtt.contexts import Action
from amqtt.plugins.base import BaseTopicPlugin
from amqtt.plugins.topic_checking import TopicAccessControlListPlugin
from amqtt.session import Session


class TopicAclPlugin(BaseTopicPlugin):  # type: ignore[misc]  # amqtt ships no types
    @dataclass
    class Config:
        publish_acl: dict[str, list[str]] = field(default_factory=dict)
        subscribe_acl: dict[str, list[str]] = field(default_factory=dict)
        receive_acl: dict[str, list[str]] = field(default_factory=dict)

    async def topic_filtering(
        self,
        *,
        session: Session | None = None,
        topic: str | None = None,
        action: Action | None = None,
    ) -> bool:
        cfg = self.config
        tables = {
            Action.PUBLISH: cfg.publish_acl,
            Action.SUBSCRIBE: cfg.subscribe_acl,
            Action.RECEIVE: cfg.receive_acl,
        }
        table = tables.get(action) if action is not None else None
        if not table or not topic or session is None or not session.username:
            return False
        allowed = table.get(session.username, ())
        match = TopicAccessControlListPlugin.topic_ac
        return any(match(topic, pattern) for pattern in allowed)
