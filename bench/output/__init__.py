"""Reading runs back: the report, its plots and summary, and run comparison."""
