# From per-run metrics to the tidy table, statistics, tables and figures.


rule aggregate:
    input:
        metrics=PLAN.finetune_metrics(),
    output:
        report(
            "results/tables/runs.csv",
            caption="../report/runs.rst",
            category="Tables",
            subcategory="All tasks",
            labels={"table": "runs"},
        ),
    log:
        "logs/aggregate/aggregate.log",
    benchmark:
        "benchmarks/aggregate/aggregate.tsv"
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        code=code_version("aggregate"),
    shell:
        "python -m medssl.aggregate --out {output} {input.metrics} > {log} 2>&1"


rule stats:
    input:
        runs="results/tables/runs.csv",
    output:
        report(
            "results/tables/summary.csv",
            caption="../report/summary.rst",
            category="Tables",
            subcategory="All tasks",
            labels={"table": "summary statistics"},
        ),
    log:
        "logs/stats/stats.log",
    benchmark:
        "benchmarks/stats/stats.tsv"
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        code=code_version("stats"),
        settings=stats_settings,
    shell:
        "python -m medssl.stats --runs {input.runs} --settings {params.settings:q}"
        " --predictions-root results/finetune"
        " --out {output} > {log} 2>&1"


rule tables:
    input:
        summary="results/tables/summary.csv",
    output:
        report(
            "results/tables/summary.md",
            caption="../report/tables.rst",
            category="Tables",
            subcategory="All tasks",
            labels={"table": "summary (Markdown)"},
        ),
    log:
        "logs/tables/tables.log",
    benchmark:
        "benchmarks/tables/tables.tsv"
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        code=code_version("tables"),
        settings=stats_settings,
    shell:
        "python -m medssl.tables --summary {input.summary} --settings {params.settings:q}"
        " --out {output} > {log} 2>&1"


rule plots:
    input:
        summary="results/tables/summary.csv",
    output:
        png=report(
            "results/figures/label_efficiency_{task}.png",
            caption="../report/label_efficiency.rst",
            category="Figures",
            subcategory="{task}",
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
        code=code_version("plots"),
        metric=task_metric,
        settings=stats_settings,
    shell:
        "python -m medssl.plots --summary {input.summary} --task {wildcards.task}"
        " --metric {params.metric} --settings {params.settings:q} --out {output.png}"
        " > {log} 2>&1"


rule efficiency:
    input:
        runs="results/tables/runs.csv",
    output:
        report(
            "results/tables/label_efficiency.csv",
            caption="../report/efficiency.rst",
            category="Tables",
            subcategory="All tasks",
            labels={"table": "label efficiency"},
        ),
    log:
        "logs/efficiency/efficiency.log",
    benchmark:
        "benchmarks/efficiency/efficiency.tsv"
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        code=code_version("efficiency"),
        settings=stats_settings,
    shell:
        "python -m medssl.efficiency --runs {input.runs} --settings {params.settings:q}"
        " --out {output} > {log} 2>&1"


rule costs:
    input:
        metrics=PLAN.finetune_metrics(),
        encoders=PLAN.encoder_files(),
        summary="results/tables/summary.csv",
    output:
        csv=report(
            "results/tables/costs.csv",
            caption="../report/costs.rst",
            category="Tables",
            subcategory="All tasks",
            labels={"table": "compute cost"},
        ),
        md="results/tables/costs.md",
    log:
        "logs/costs/costs.log",
    benchmark:
        "benchmarks/costs/costs.tsv"
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        code=code_version("costs"),
        benchmarks=PLAN.training_benchmarks(),
        device=config["compute"]["device"],
    shell:
        "python -m medssl.costs --benchmarks {params.benchmarks} --results results"
        " --summary {input.summary} --default-device {params.device}"
        " --out {output.csv} --markdown {output.md} > {log} 2>&1"


rule task_tables:
    input:
        summary="results/tables/summary.csv",
    output:
        csv=report(
            "results/tables/summary_{task}.csv",
            caption="../report/task_tables.rst",
            category="Tables",
            subcategory="{task}",
            labels={"task": "{task}", "table": "summary (CSV)"},
        ),
        tex=report(
            "results/tables/summary_{task}.tex",
            caption="../report/task_tables.rst",
            category="Tables",
            subcategory="{task}",
            labels={"task": "{task}", "table": "summary (LaTeX)"},
        ),
    log:
        "logs/tables/{task}.log",
    benchmark:
        "benchmarks/tables/{task}.tsv"
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        code=code_version("tables"),
        settings=stats_settings,
    shell:
        "python -m medssl.tables --summary {input.summary} --settings {params.settings:q}"
        " --task {wildcards.task} --csv {output.csv} --latex {output.tex} > {log} 2>&1"


rule bars:
    input:
        summary="results/tables/summary.csv",
    output:
        png=report(
            "results/figures/bars_{task}.png",
            caption="../report/bars.rst",
            category="Figures",
            subcategory="{task}",
            labels={"task": "{task}", "figure": "bars per fraction"},
        ),
        pdf="results/figures/bars_{task}.pdf",
    log:
        "logs/figures/bars_{task}.log",
    benchmark:
        "benchmarks/figures/bars_{task}.tsv"
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        code=code_version("figures"),
        metric=task_metric,
        settings=stats_settings,
    shell:
        "python -m medssl.figures bars --table {input.summary} --task {wildcards.task}"
        " --metric {params.metric} --settings {params.settings:q} --out {output.png}"
        " > {log} 2>&1"


rule heatmap:
    input:
        summary="results/tables/summary.csv",
    output:
        png=report(
            "results/figures/heatmap_frac{fraction}.png",
            caption="../report/heatmap.rst",
            category="Figures",
            subcategory="All tasks",
            labels={"fraction": "{fraction}", "figure": "heat map"},
        ),
        pdf="results/figures/heatmap_frac{fraction}.pdf",
    log:
        "logs/figures/heatmap_frac{fraction}.log",
    benchmark:
        "benchmarks/figures/heatmap_frac{fraction}.tsv"
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        code=code_version("figures"),
        metrics=task_metrics,
        settings=stats_settings,
    shell:
        "python -m medssl.figures heatmap --table {input.summary} --fraction {wildcards.fraction}"
        " --metrics {params.metrics:q} --settings {params.settings:q} --out {output.png}"
        " > {log} 2>&1"


rule forest:
    input:
        efficiency="results/tables/label_efficiency.csv",
    output:
        png=report(
            "results/figures/forest.png",
            caption="../report/forest.rst",
            category="Figures",
            subcategory="All tasks",
            labels={"figure": "label-efficiency slopes"},
        ),
        pdf="results/figures/forest.pdf",
    log:
        "logs/figures/forest.log",
    benchmark:
        "benchmarks/figures/forest.tsv"
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        code=code_version("figures"),
        settings=stats_settings,
    shell:
        "python -m medssl.figures forest --table {input.efficiency}"
        " --settings {params.settings:q} --out {output.png} > {log} 2>&1"


# --- partial results: `snakemake partial --nolock` while a sweep runs ---------
# Not part of `all`. The metrics files are not inputs (that would make this
# target schedule the sweep); a fingerprint of what exists is a param instead,
# so the target reruns exactly when runs have been added or rewritten.


rule partial_runs:
    output:
        "results/partial/runs.csv",
    log:
        "logs/partial/aggregate.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        code=code_version("aggregate"),
        fingerprint=partial_fingerprint,
    shell:
        "python -m medssl.aggregate --partial --root results/finetune --out {output}"
        " > {log} 2>&1"


rule partial_stats:
    input:
        runs="results/partial/runs.csv",
    output:
        "results/partial/summary.csv",
    log:
        "logs/partial/stats.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        code=code_version("stats"),
        settings=stats_settings,
    shell:
        "python -m medssl.stats --runs {input.runs} --settings {params.settings:q}"
        " --predictions-root results/finetune"
        " --out {output} > {log} 2>&1"


rule partial:
    input:
        summary="results/partial/summary.csv",
    output:
        "results/partial/summary.md",
    log:
        "logs/partial/tables.log",
    localrule: True
    conda:
        "../../envs/report.yaml"
    params:
        code=code_version("tables"),
        settings=stats_settings,
    shell:
        "python -m medssl.tables --summary {input.summary} --settings {params.settings:q}"
        " --out {output} > {log} 2>&1"
