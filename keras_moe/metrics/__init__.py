"""Keras metrics of the MoE layers."""

from keras_moe.metrics.router_stats_metric import RouterStatsMetric
