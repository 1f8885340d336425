"""Our app-config.js for the viewer, the page shown without a build, and the dashboard's links
and frame to the viewer.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from sqlalchemy import select

from dashboard import security
from pipeline.models import Study
from pipeline.settings import ConfigError
from pipeline.viewer import ohif
from tests.web import app_for, login


def _config(js: str) -> dict:
    match = re.search(r"^window\.config = (\{.*?\n\});$", js, re.S | re.M)
    assert match, js
    return json.loads(match.group(1))  # type: ignore[no-any-return]


def test_our_app_config_reads_this_dashboards_dicomweb(viewer) -> None:  # type: ignore[no-untyped-def]
    response = viewer.get("/ohif/app-config.js")
    js = response.get_data(as_text=True)
    assert response.mimetype == "text/javascript" and "config/default.js" not in js
    config = _config(js)
    assert (config["routerBasename"], config["showStudyList"]) == ("/ohif", True)
    assert config["investigationalUseDialog"] == {"option": "never"}
    assert config["defaultDataSourceName"] == "dicomweb" and len(config["dataSources"]) == 1
    source = config["dataSources"][0]
    assert source["namespace"] == "@ohif/extension-default.dataSourcesModule.dicomweb"
    c = source["configuration"]
    assert (c["qidoRoot"], c["wadoRoot"], c["wadoUriRoot"]) == ("/dicomweb",) * 3
    assert (c["imageRendering"], c["thumbnailRendering"]) == ("wadors", "wadors")
    assert c["bulkDataURI"] == {"enabled": True} and c["omitQuotationForMultipartRequest"] is True
    assert (c["supportsFuzzyMatching"], c["supportsWildcard"], c["dicomUploadEnabled"]) == (
        False,
        False,
        False,
    )
    assert not re.search(r"https?://", js)  # nothing from elsewhere: no CDN, no analytics


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_the_app_config_makes_the_roots_absolute_against_the_page(viewer) -> None:  # type: ignore[no-untyped-def]
    js = viewer.get("/ohif/app-config.js").get_data(as_text=True)
    probe = (
        "globalThis.window = {location: {origin: 'http://pacs-less.example:8000'}};\n"
        + js
        + "\nconsole.log(JSON.stringify(window.config.dataSources[0].configuration));"
    )
    out = subprocess.run(["node", "-e", probe], capture_output=True, text=True, timeout=30)
    c = json.loads(out.stdout)
    assert c["qidoRoot"] == c["wadoRoot"] == "http://pacs-less.example:8000/dicomweb"


def test_a_sites_pacs_as_the_data_source(settings, populated, build) -> None:  # type: ignore[no-untyped-def]
    client = app_for(
        settings,
        ohif_dir=str(build),
        viewer_dicomweb_url="https://pacs.example.org:8443/dicom-web/",
    ).test_client()
    login(client)
    c = _config(client.get("/ohif/app-config.js").get_data(as_text=True))["dataSources"][0]
    assert c["configuration"]["qidoRoot"] == "https://pacs.example.org:8443/dicom-web"
    policy = client.get("/ohif/").headers["Content-Security-Policy"]
    assert "connect-src 'self' https://pacs.example.org:8443;" in policy
    assert policy.count("pacs.example.org") == 1  # its origin may be fetched from, nothing else
    with pytest.raises(ConfigError):
        app_for(settings, viewer_dicomweb_url="ftp://pacs.example.org/")


def test_without_a_build_the_viewer_says_how_to_install_it(client_without_build) -> None:  # type: ignore[no-untyped-def]
    for path in ("/ohif/", "/ohif/viewer?StudyInstanceUIDs=1.2.3", "/ohif/app.bundle.css"):
        response = client_without_build.get(path)
        html = response.get_data(as_text=True)
        assert response.status_code == 404, path
        assert "cxr-triage ohif install" in html and "make install" in html
        assert f"@ohif/app</code> {ohif.VERSION}" in html
        assert response.headers["Content-Security-Policy"] == security.CSP


def _dicom_study(populated) -> Study:  # type: ignore[no-untyped-def]
    with populated() as session:
        return session.scalars(select(Study).where(Study.study_uid.is_not(None))).one()


def test_links_to_the_viewer_only_with_a_build_and_a_study_uid(
    viewer, client_without_build, populated
) -> None:  # type: ignore[no-untyped-def]
    dicom = _dicom_study(populated)
    reading = f'href="/studies/{dicom.id}?view=ohif"'
    page = viewer.get(f"/studies/{dicom.id}").get_data(as_text=True)
    assert f'<a id="open-in-viewer" {reading}>' in page and "<kbd>v</kbd>" in page
    rows = viewer.get("/worklist/rows").get_data(as_text=True)
    assert rows.count("Open in viewer") == 1 and reading in rows  # the JPEG/PNG ones have no UID
    assert "<th>Viewer</th>" in viewer.get("/").get_data(as_text=True)
    with populated() as session:
        jpeg = session.scalars(select(Study).where(Study.study_uid.is_(None))).first()
    assert "open-in-viewer" not in viewer.get(f"/studies/{jpeg.id}").get_data(as_text=True)
    # no UID: view=ohif falls back to the preview page
    assert 'id="ohif-frame"' not in viewer.get(f"/studies/{jpeg.id}?view=ohif").get_data(
        as_text=True
    )

    plain = client_without_build.get(f"/studies/{dicom.id}").get_data(as_text=True)
    assert "open-in-viewer" not in plain and 'id="radiograph"' in plain  # the preview stays
    assert "<code>cxr-triage ohif install</code>" in plain  # and how to get the viewer
    assert 'id="viewer-missing"' not in page
    assert 'id="ohif-frame"' not in client_without_build.get(
        f"/studies/{dicom.id}?view=ohif"
    ).get_data(as_text=True)
    assert "Open in viewer" not in client_without_build.get("/worklist/rows").get_data(as_text=True)
    assert "<th>Viewer</th>" not in client_without_build.get("/").get_data(as_text=True)


def test_the_viewer_beside_the_review_panel(viewer, populated) -> None:  # type: ignore[no-untyped-def]
    dicom = _dicom_study(populated)
    page = viewer.get(f"/studies/{dicom.id}?view=ohif").get_data(as_text=True)
    src = f"/ohif/viewer?StudyInstanceUIDs={dicom.study_uid}"
    assert f'<iframe id="ohif-frame" src="{src}"' in page
    assert 'id="review-form"' in page and 'id="radiograph"' not in page
    assert f'action="/studies/{dicom.id}/review?view=ohif"' in page  # comes back to this view
    assert f'<a id="open-in-viewer" href="/studies/{dicom.id}">' in page  # v: the preview
    token = page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    done = viewer.post(
        f"/studies/{dicom.id}/review?view=ohif", data={"action": "read", "csrf_token": token}
    )
    assert done.status_code == 302 and done.headers["Location"] == f"/studies/{dicom.id}?view=ohif"
    framed = viewer.get(src)
    assert framed.headers["X-Frame-Options"] == "SAMEORIGIN"
    assert "frame-ancestors 'self'" in framed.headers["Content-Security-Policy"]
    # the rest of the dashboard may be framed by nobody
    plain = viewer.get(f"/studies/{dicom.id}")
    assert plain.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in plain.headers["Content-Security-Policy"]
