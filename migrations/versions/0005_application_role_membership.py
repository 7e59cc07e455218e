"""Let the migrating login work as the application role.

The application switches to `clearing_app` (`SET ROLE`) on every connection; a login that is
not a superuser may do so only as a member of it. This grants membership to the role running
the migrations (the schema owner), so the same login serves migrations (as itself) and the
application (as `clearing_app`).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        """
        DO $$
        BEGIN
            IF NOT (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
                EXECUTE format('GRANT clearing_app TO %I', current_user);
            END IF;
        EXCEPTION WHEN duplicate_object OR insufficient_privilege THEN
            NULL;  -- already a member, or the role was created by another owner
        END $$
        """
    )


def downgrade() -> None:
    """Membership is left in place: other schemas may rely on it."""
