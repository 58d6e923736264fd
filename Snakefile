# medssl: which pre-training should you start from when you have few labels?
# This file is the table of contents; each stage lives in workflow/rules/.


from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/imports.smk"
include: "workflow/rules/supervised.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        PLAN.final_outputs(),
