"""The app's own tables, on its own declarative base."""

from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """The app's models (hermes_orm's are on hermes_orm.models.Base)."""


class Account(Base):
    """Who a conversation belongs to."""

    __tablename__ = "accounts"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
