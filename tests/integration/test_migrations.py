"""The Alembic migrations and the SQLAlchemy models describe the same schema."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect

from schema.migrate import downgrade, upgrade
from schema.tables import Base
from tests.conftest import sqlalchemy_url

pytestmark = pytest.mark.integration


def test_models_and_migrations_agree(db_engine: Engine) -> None:
    with db_engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []


def test_migrations_create_every_table_and_the_view(db_engine: Engine) -> None:
    inspector = inspect(db_engine)
    assert set(Base.metadata.tables) <= set(inspector.get_table_names())
    assert "job_progress" in inspector.get_view_names()


def test_downgrade_to_base_and_upgrade_again(scratch_database_url: str) -> None:
    """On a database of its own, so the session's migrated database stays untouched."""
    url = sqlalchemy_url(scratch_database_url)
    downgrade(url, "base")
    engine = create_engine(url)
    assert inspect(engine).get_table_names() == ["alembic_version"]
    engine.dispose()
    upgrade(url)
