# From per-run metrics to the tidy table, statistics, tables and figures.


rule aggregate:
    input:
        metrics=finetune_metrics(),
        code=code("aggregate"),
    output:
        report(
            "results/tables/runs.csv",
            caption="../report/runs.rst",
            category="Tables",
        ),
    log:
        "logs/aggregate/aggregate.log",
    benchmark:
        "benchmarks/aggregate/aggregate.tsv"
    localrule: True
    conda:
        "../../envs/report.yaml"
    shell:
        "python -m medssl.aggregate --out {output} {input.metrics} > {log} 2>&1"


rule stats:
    input:
        runs="results/tables/runs.csv",
        code=code("stats"),
    output:
        report(
            "results/tables/summary.csv",
            caption="../report/summary.rst",
            category="Tables",
        ),
    log:
        "logs/stats/stats.log",
    benchmark:
        "benchmarks/stats/stats.tsv"
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        settings=stats_settings,
    shell:
        "python -m medssl.stats --runs {input.runs} --settings {params.settings:q}"
        " --out {output} > {log} 2>&1"


rule tables:
    input:
        summary="results/tables/summary.csv",
        code=code("tables"),
    output:
        report(
            "results/tables/summary.md",
            caption="../report/tables.rst",
            category="Tables",
        ),
    log:
        "logs/tables/tables.log",
    benchmark:
        "benchmarks/tables/tables.tsv"
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        settings=stats_settings,
    shell:
        "python -m medssl.tables --summary {input.summary} --settings {params.settings:q}"
        " --out {output} > {log} 2>&1"


rule plots:
    input:
        summary="results/tables/summary.csv",
        code=code("plots"),
    output:
        png=report(
            "results/figures/label_efficiency_{task}.png",
            caption="../report/label_efficiency.rst",
            category="Label efficiency",
            labels={"task": "{task}", "figure": "label efficiency"},
        ),
        pdf="results/figures/label_efficiency_{task}.pdf",
    log:
        "logs/plots/{task}.log",
    benchmark:
        "benchmarks/plots/{task}.tsv"
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        metric=task_metric,
        settings=stats_settings,
    shell:
        "python -m medssl.plots --summary {input.summary} --task {wildcards.task}"
        " --metric {params.metric} --settings {params.settings:q} --out {output.png}"
        " > {log} 2>&1"
