"""Both overlays render, and every object is valid for the newest Kubernetes we can check against."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest

from tests.manifests import render

# The newest schema kubernetes-validate ships (1.37 with kubernetes-validate 1.37.0): a
# package upgrade moves the target forward, and a removed API then fails here first.
K8S_VERSION = kubernetes_validate.latest_version()

# Every kustomization in k8s/ that a user may build.
BUILDABLE = {
    **{f"overlays/{name}": path for name, path in render.OVERLAYS.items()},
    "base": render.K8S / "base",
    "base/kubernetes-auth": render.K8S / "base" / "kubernetes-auth",
}
# Namespaces every cluster has; RoleBindings for workload namespaces may live there.
BUILTIN_NAMESPACES = {"default", "kube-system", "kube-public"}


@pytest.mark.parametrize("name", sorted(BUILDABLE))
def test_renders_without_duplicates(name: str) -> None:
    objs = render.render(BUILDABLE[name])

    assert objs
    keys = [render.key(o) for o in objs]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("name", sorted(BUILDABLE))
def test_every_object_validates_strictly(name: str) -> None:
    errors = []
    for obj in render.render(BUILDABLE[name]):
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
            errors.append(f"{render.key(obj)}: {exc}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", sorted(BUILDABLE))
def test_kubectl_kustomize_renders_the_same_objects(name: str) -> None:
    if render.kubectl_kustomize() is None:
        pytest.skip("no kubectl with kustomize v5+: the Python renderer alone covers this run")
    ours = {render.key(o): o for o in render.render(BUILDABLE[name])}
    theirs = {render.key(o): o for o in render.kubectl_render(BUILDABLE[name]) or []}

    assert sorted(ours) == sorted(theirs)
    assert [k for k in ours if ours[k] != theirs[k]] == []


def test_namespaced_objects_live_in_namespaces_the_render_creates(overlay) -> None:
    created = {o["metadata"]["name"] for o in render.find(overlay, "Namespace")}
    for obj in overlay:
        if obj["kind"] in render.CLUSTER_SCOPED:
            assert "namespace" not in obj["metadata"], render.key(obj)
            continue
        namespace = obj["metadata"].get("namespace")
        assert namespace, f"{render.key(obj)} has no namespace (it would land in the caller's)"
        if namespace in BUILTIN_NAMESPACES:
            assert obj["kind"] == "RoleBinding", f"only workload RoleBindings belong in {namespace}"
        else:
            assert namespace in created, render.key(obj)


def test_every_object_is_labelled_part_of_agentjobs(overlay) -> None:
    for obj in overlay:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "agentjobs", render.key(obj)


# -- the renderer itself ---------------------------------------------------------------------


def _kustomization(tmp_path: Path, text: str) -> Path:
    (tmp_path / "kustomization.yaml").write_text(text)
    return tmp_path


def test_renderer_refuses_fields_it_does_not_implement(tmp_path: Path) -> None:
    root = _kustomization(tmp_path, "commonLabels: {a: b}\n")
    with pytest.raises(render.RenderError, match="commonLabels"):
        render.render(root)


def test_renderer_refuses_files_outside_the_kustomization_like_kustomize(tmp_path: Path) -> None:
    (tmp_path / "outside.txt").write_text("x")
    root = tmp_path / "k"
    root.mkdir()
    _kustomization(root, "configMapGenerator:\n  - name: c\n    files: [../outside.txt]\n")
    with pytest.raises(render.RenderError, match="not in or below"):
        render.render(root)


def test_renderer_hashes_generated_config_maps_like_kustomize(tmp_path: Path) -> None:
    # Given the name kustomize 5.5 gives this ConfigMap (kubectl kustomize, measured)
    (tmp_path / "p.hcl").write_text("a = 1\n")
    root = _kustomization(tmp_path, "configMapGenerator:\n  - name: pol\n    files: [p.hcl]\n")

    (cm,) = render.render(root)

    assert cm["metadata"]["name"] == "pol-tft464m588"


def test_quantities() -> None:
    assert render.quantity("500m") == render.quantity("0.5")
    assert render.quantity("768Mi") == 768 * 2**20
    assert render.quantity("15Gi") == 20 * render.quantity("768Mi")
    assert render.quantity(2) == 2
