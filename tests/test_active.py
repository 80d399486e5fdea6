"""The ranking of unlabeled tasks (backend.core.active) on synthetic clusters and on real MobileNetV2 features."""

from __future__ import annotations

import torch

from backend.core.active import kmeans, margin_order, rank_unlabeled, typicality


def blobs(sizes: list[int], dim: int = 8, spread: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Well separated clusters of the given sizes (cluster c around the c-th basis vector)."""
    generator = torch.Generator().manual_seed(seed)
    rows, members = [], []
    for cluster, size in enumerate(sizes):
        centre = torch.zeros(dim)
        centre[cluster] = 1.0
        rows.append(centre + spread * torch.randn(size, dim, generator=generator))
        members += [cluster] * size
    return torch.cat(rows), members


def test_kmeans_recovers_separated_clusters():
    x, members = blobs([30, 20, 10])
    assignment = kmeans(x, 3, seed=1)
    groups = {tuple(sorted(i for i in range(len(members)) if members[i] == c)) for c in range(3)}
    found = {tuple((assignment == c).nonzero().flatten().tolist()) for c in assignment.unique().tolist()}
    assert found == groups


def test_typicality_picks_one_per_uncovered_cluster_largest_first_and_its_densest_point():
    x, members = blobs([30, 20, 10])
    x[5] = x[5] * 3  # an outlier inside the largest cluster: never its representative
    ranking = rank_unlabeled(x, [False] * len(x), batch=3)
    assert ranking.strategy == "typicality"
    firsts = ranking.order[:3]
    assert [members[i] for i in firsts] == [0, 1, 2]
    density = typicality(torch.nn.functional.normalize(x[:30], dim=1))
    assert firsts[0] == int(density.argmax())
    assert ranking.order.index(5) > 3
    assert sorted(ranking.order) == list(range(len(x)))  # every unlabeled task is ranked once


def test_typicality_skips_clusters_a_label_already_covers():
    x, members = blobs([30, 20, 10])
    labeled = [False] * len(x)
    labeled[0] = True  # the largest cluster is covered
    ranking = rank_unlabeled(x, labeled, batch=2)
    assert [members[i] for i in ranking.order[:2]] == [1, 2]
    assert 0 not in ranking.order


def test_margin_takes_over_once_every_class_has_enough_labels():
    x, _ = blobs([10, 10])
    probabilities = torch.tensor([[0.5 + 0.025 * i, 0.5 - 0.025 * i] for i in range(20)])
    labeled = [i < 2 for i in range(20)]
    early = rank_unlabeled(x, labeled, batch=4, probabilities=probabilities, labels_per_class=[1, 1],
                           switch_labels_per_class=3)
    late = rank_unlabeled(x, labeled, batch=4, probabilities=probabilities, labels_per_class=[3, 4],
                          switch_labels_per_class=3)
    assert early.strategy == "typicality" and late.strategy == "margin"
    assert late.order == list(range(2, 20))  # smallest margin (closest to 50/50) first
    assert margin_order(probabilities, [7, 3]) == [3, 7]


def test_on_real_features_the_first_picks_cover_both_classes(hymenoptera_features):
    features, labels = hymenoptera_features
    ranking = rank_unlabeled(features, [False] * len(labels), batch=4)
    assert len(set(ranking.order)) == len(labels)
    assert {labels[i] for i in ranking.order[:4]} == {"ants", "bees"}


def test_label_studio_refusing_the_sampling_change_is_recorded_and_shown_never_raised(settings, redis, encoders):
    from backend.admin import views
    from backend.labelstudio.projects import ProjectRegistry
    from backend.loop.active_queue import ensure_sampling, queue_status
    from backend.loop.services import build_services
    from bench.resources import free_port
    from tests.helpers import CONFIG_2

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: every API call is refused
    services = build_services(settings.replace(active_learning=True, label_studio_url=closed,
                                               label_studio_api_key="0" * 40), redis, encoders=encoders)
    ProjectRegistry(redis).remember("7", CONFIG_2)
    services.tasks.put_many("7", [{"id": i, "data": {"image": f"/data/upload/7/{i}.jpg"}} for i in (1, 2, 3)])
    services.labels.put("7", {"id": 11, "task": 1, "result": [{"from_name": "label", "to_name": "image",
                                                               "type": "choices", "value": {"choices": ["ants"]}}],
                              "was_cancelled": False, "updated_at": "2026-12-01T00:00:00Z"},
                        {"id": 1, "data": {"image": "/data/upload/7/1.jpg"}})
    assert ensure_sampling(services, "7") == "refused"
    status = queue_status(services, "7")
    assert (status["labeled"], status["unlabeled"], status["current"]) == (1, 2, 0)
    assert "could not set Uncertainty sampling" in status["note"] and "Settings → Annotation" in status["note"]
    (shown,) = views.status(services)["projects"]
    assert shown["queue"] == status


def test_with_active_learning_off_the_project_is_recorded_as_untouched(settings, redis, encoders):
    from backend.loop.active_queue import ensure_sampling, queue_status, refresh_queue
    from backend.loop.services import build_services

    services = build_services(settings, redis, encoders=encoders)  # the fixture's ACTIVE_LEARNING=false
    assert ensure_sampling(services, "7") == "off"
    assert refresh_queue(services, "7")["status"].startswith("skipped")
    assert queue_status(services, "7")["sampling"] == "untouched (ACTIVE_LEARNING=false)"
