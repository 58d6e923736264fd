"""From runs to a paper: the runs table, statistics, label efficiency, tables and figures."""
