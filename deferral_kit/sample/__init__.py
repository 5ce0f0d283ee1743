"""Generated mail worlds with known truth, and writers that render them as real MTA logs.

``generate(WorldConfig(...)) -> World`` simulates one format-independent world;
``write(world, fmt, out_dir)`` renders it as postfix, exim, powermta, kumomta, exchange, sendgrid, mailgun, ses, sparkpost or postmark
files; ``cli(args)`` backs ``deferral-kit sample``.
"""

from .world import DEFAULT_START, Episode, SendingIP, World, WorldConfig, default_episodes, generate
from .writers import FORMATS, cli, write

__all__ = ["Episode", "SendingIP", "World", "WorldConfig", "generate", "write", "cli", "FORMATS", "DEFAULT_START", "default_episodes"]
