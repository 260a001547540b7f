"""dadpo-offline: daDPO distillation from an offline, SQL-queryable cache."""
__version__ = "0.1.0"
