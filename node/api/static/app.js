// The administrator's page of dicom-ai-node: plain JavaScript over the node's /api/v1, nothing else.
//
// Every value from the API goes into the page as text (textContent), never as HTML: a patient name or a
// DICOM description is data a sender chose. The token lives in sessionStorage, so it is asked once per
// browser session and forgotten when the browser closes. What a token may see and do is the server's
// decision; the page only hides what the server would refuse anyway.
"use strict";

(function () {
  const TOKEN_KEY = "ainode-token";
  const REFRESH_MS = 5000;
  const PAGE_SIZE = 50;
  const API = "api/v1/"; // relative: the page also works behind a reverse proxy's path prefix

  const state = {
    me: null, // {name, role} from /whoami
    offset: 0,
    timer: null,
    busy: false,
    again: false, // a refresh was asked for while one was running
  };

  class AuthError extends Error {}

  // What each table shows now, to leave it alone when a refresh brings the same.
  const signatures = new WeakMap();

  // -- small helpers ---------------------------------------------------------------------------
  function $(id) {
    return document.getElementById(id);
  }

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function isAdmin() {
    return state.me !== null && state.me.role === "admin";
  }

  function pad(n) {
    return String(n).padStart(2, "0");
  }

  // The API's times are UTC; a hospital reads its own local time.
  function fmtTime(value) {
    if (!value) return "";
    const text = String(value);
    const zoned = /([zZ]|[+-]\d\d:?\d\d)$/.test(text) ? text : text + "Z";
    const t = new Date(zoned);
    if (Number.isNaN(t.getTime())) return text;
    return (
      `${t.getFullYear()}-${pad(t.getMonth() + 1)}-${pad(t.getDate())} ` +
      `${pad(t.getHours())}:${pad(t.getMinutes())}:${pad(t.getSeconds())}`
    );
  }

  function fmtValue(value) {
    if (value === null || value === undefined) return "";
    if (Array.isArray(value)) return value.map(fmtValue).join(", ");
    if (typeof value === "object") return JSON.stringify(value);
    if (typeof value === "number" && !Number.isInteger(value)) return value.toFixed(2);
    return String(value);
  }

  function badge(value) {
    const text = value === null || value === undefined ? "" : String(value);
    return el("span", text, "badge state-" + text.replace(/[^a-z-]/g, ""));
  }

  function timeCell(value) {
    const span = el("span", fmtTime(value), "time");
    if (value) span.title = String(value);
    return span;
  }

  function uidCell(value) {
    return el("span", value, "uid");
  }

  // Fills a <table> with a header of column labels and one row per item; a column gives a string or a node.
  function fillTable(table, columns, rows, empty) {
    // Unchanged since the last refresh: keep the rows as they are (focus, selection, a button being clicked).
    const signature = JSON.stringify([columns.map((c) => c.label), rows, isAdmin()]);
    if (signatures.get(table) === signature) return;
    signatures.set(table, signature);
    const head = el("thead");
    const tr = el("tr");
    for (const column of columns) tr.appendChild(el("th", column.label));
    head.appendChild(tr);
    const body = el("tbody");
    if (rows.length === 0) {
      const row = el("tr");
      const cell = el("td", empty || "nothing yet", "empty");
      cell.colSpan = columns.length;
      row.appendChild(cell);
      body.appendChild(row);
    }
    for (const item of rows) {
      const row = el("tr");
      for (const column of columns) {
        const value = column.value(item);
        const cell = el("td");
        if (column.className) cell.className = column.className;
        if (value instanceof Node) cell.appendChild(value);
        else cell.textContent = fmtValue(value);
        row.appendChild(cell);
      }
      if (rows.onRow) rows.onRow(row, item);
      body.appendChild(row);
    }
    table.replaceChildren(head, body);
  }

  function col(label, value, className) {
    return { label, value: typeof value === "function" ? value : (item) => item[value], className };
  }

  function showMessage(text, isError) {
    const box = $("message");
    box.textContent = text;
    box.className = isError ? "error" : "ok";
    box.hidden = false;
  }

  // -- the API -----------------------------------------------------------------------------------
  async function api(path, method) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) throw new AuthError("no token");
    const response = await fetch(API + path, {
      method: method || "GET",
      headers: { Authorization: "Bearer " + token, Accept: "application/json" },
      cache: "no-store",
      credentials: "omit",
    });
    if (response.status === 401) throw new AuthError("token not accepted");
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (!response.ok) {
      const detail = body && body.detail ? fmtValue(body.detail) : response.statusText;
      throw new Error(`${response.status}: ${detail}`);
    }
    return body;
  }

  function items(body) {
    if (body && Array.isArray(body.items)) return body.items;
    return Array.isArray(body) ? body : [];
  }

  // What an action's answer says happened: a DIMSE status, a job's or delivery's new state, jobs queued.
  function outcome(body) {
    if (!body || typeof body !== "object") return "";
    const parts = [];
    if (typeof body.status === "number") parts.push("status 0x" + body.status.toString(16).toUpperCase().padStart(4, "0"));
    if (body.address) parts.push(fmtValue(body.address));
    if (body.state) parts.push("now " + fmtValue(body.state) + (body.previous ? ", was " + fmtValue(body.previous) : ""));
    if (Array.isArray(body.queued)) parts.push(`${body.queued.length} job(s) queued`);
    if (Array.isArray(body.unchanged) && body.unchanged.length) parts.push(`${body.unchanged.length} job(s) still open`);
    return parts.length ? " (" + parts.join("; ") + ")" : "";
  }

  // Runs an admin action and tells what came of it; the server checks the role again.
  async function act(button, path, done) {
    button.disabled = true;
    try {
      const body = await api(path, "POST");
      if (body && body.ok === false) {
        showMessage(`${done}: failed${body.error ? " (" + fmtValue(body.error) + ")" : ""}`, true);
      } else {
        showMessage(`${done}: ok${outcome(body)}`, false);
      }
      return body;
    } catch (error) {
      if (error instanceof AuthError) askForToken("The token was not accepted any more; enter it again.");
      else showMessage(`${done}: ${error.message}`, true);
      return null;
    } finally {
      button.disabled = false;
      refresh();
    }
  }

  function actionButton(label, path, done, className) {
    const button = el("button", label, "action " + (className || ""));
    button.type = "button";
    button.addEventListener("click", (event) => {
      event.stopPropagation();
      act(button, path, done);
    });
    return button;
  }

  // -- login -------------------------------------------------------------------------------------
  function askForToken(why) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.me = null;
    document.body.classList.remove("admin");
    for (const view of document.querySelectorAll(".view")) view.hidden = true;
    // Nothing read with the old token stays in the page, not even hidden (patient names).
    for (const table of document.querySelectorAll("table")) {
      table.replaceChildren();
      signatures.delete(table);
    }
    $("study-fields").replaceChildren();
    $("study-uid").textContent = "";
    $("nav").hidden = true;
    $("session").hidden = true;
    $("message").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = why || "";
    $("token").value = "";
    $("token").focus();
  }

  async function signIn(token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    try {
      state.me = await api("whoami");
    } catch (error) {
      askForToken(
        error instanceof AuthError ? "This token was not accepted." : `The node did not answer: ${error.message}`
      );
      return;
    }
    document.body.classList.toggle("admin", isAdmin());
    $("who").textContent = `${state.me.name} (${state.me.role})`;
    $("login").hidden = true;
    $("nav").hidden = false;
    $("session").hidden = false;
    show();
  }

  // -- views -------------------------------------------------------------------------------------
  function currentView() {
    const hash = decodeURIComponent(location.hash.replace(/^#/, ""));
    if (hash.startsWith("study/")) return { name: "study", uid: hash.slice("study/".length) };
    const known = ["studies", "models", "routes", "peers", "audit", "associations"];
    return { name: known.includes(hash) ? hash : "studies" };
  }

  function show() {
    if (state.me === null) return;
    const view = currentView();
    for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== "view-" + view.name;
    for (const link of document.querySelectorAll("#nav a")) {
      const here = link.dataset.view === view.name || (view.name === "study" && link.dataset.view === "studies");
      link.classList.toggle("current", here);
    }
    refresh();
  }

  async function refresh() {
    if (state.me === null) return;
    if (state.busy) {
      state.again = true;
      return;
    }
    state.busy = true;
    state.again = false;
    const view = currentView();
    try {
      if (view.name === "studies") await renderStudies();
      else if (view.name === "study") await renderStudy(view.uid);
      else if (view.name === "models") await renderModels();
      else if (view.name === "routes") await renderRoutes();
      else if (view.name === "peers") await renderPeers();
      else if (view.name === "audit") await renderAudit();
      else if (view.name === "associations") await renderAssociations();
      $("updated").textContent = "updated " + fmtTime(new Date().toISOString());
      $("updated").classList.remove("stale");
    } catch (error) {
      if (error instanceof AuthError) askForToken("The token was not accepted any more; enter it again.");
      else {
        $("updated").textContent = "could not read the node: " + error.message;
        $("updated").classList.add("stale");
      }
    } finally {
      state.busy = false;
    }
    if (state.again) refresh();
  }

  async function renderStudies() {
    const params = new URLSearchParams({ limit: String(PAGE_SIZE), offset: String(state.offset) });
    const days = $("since").value;
    if (days) params.set("since", new Date(Date.now() - Number(days) * 86400000).toISOString());
    if ($("state").value) params.set("state", $("state").value);
    // The list has no jobs; the newest jobs, joined here by UID, say what became of each study.
    const [body, jobsBody] = await Promise.all([api("studies?" + params.toString()), api("jobs?limit=500")]);
    const rows = items(body);
    const jobsOf = new Map();
    for (const job of items(jobsBody)) {
      if (!jobsOf.has(job.study_instance_uid)) jobsOf.set(job.study_instance_uid, []);
      jobsOf.get(job.study_instance_uid).push(job);
    }
    const current = (study) =>
      (jobsOf.get(study.study_instance_uid) || []).filter((j) => j.version === undefined || j.version === study.version);
    const withPatient = rows.some((s) => "patient_name" in s);
    const columns = [
      col("Last received", (s) => timeCell(s.last_received_at)),
      col("State", (s) => badge(s.state)),
      col("Study Instance UID", (s) => uidCell(s.study_instance_uid), "uidcol"),
    ];
    if (withPatient) {
      columns.push(
        col(
          "Patient",
          (s) => {
            const cell = el("span", s.patient_name);
            if (s.patient_id) cell.appendChild(el("span", s.patient_id, "patient-id"));
            return cell;
          },
          "phi"
        )
      );
    }
    columns.push(
      col("Study date", "study_date", "date"),
      col("Modalities", "modalities"),
      col("Instances", "instances", "num"),
      col("Sender", "sender"),
      col("Jobs", (s) => {
        const cell = el("span", null, "badges");
        for (const job of current(s)) {
          const b = badge(job.state);
          b.textContent = `${job.pipeline} ${job.state}`;
          cell.appendChild(b);
        }
        return cell;
      }),
      col("Reasons", (s) => {
        const reasons = s.note ? [s.note] : [];
        for (const job of current(s)) {
          if (job.reason && job.state !== "done") reasons.push(`${job.pipeline}: ${job.reason}`);
        }
        return reasons.join("\n");
      }, "reason")
    );
    rows.onRow = (row, study) => {
      row.classList.add("link");
      row.dataset.uid = study.study_instance_uid;
      row.tabIndex = 0;
      const open = () => {
        location.hash = "study/" + encodeURIComponent(study.study_instance_uid);
      };
      row.addEventListener("click", open);
      row.addEventListener("keydown", (event) => {
        if (event.key === "Enter") open();
      });
    };
    fillTable($("studies-table"), columns, rows, "no study in this period");
    const total = body && typeof body.total === "number" ? body.total : rows.length;
    const last = Math.min(state.offset + rows.length, total);
    $("study-count").textContent = total ? `${state.offset + 1}–${last} of ${total}` : "0 studies";
    $("prev-page").disabled = state.offset === 0;
    $("next-page").disabled = last >= total;
  }

  async function renderStudy(uid) {
    const study = await api("studies/" + encodeURIComponent(uid));
    $("study-uid").textContent = study.study_instance_uid;
    const fields = [
      ["State", badge(study.state)],
      ["Note", study.note],
      ["Version", study.version],
      ["Instances", study.instances],
      ["Sender", study.sender],
      ["Last received", timeCell(study.last_received_at)],
      ["Study date", study.study_date],
      ["Modalities", study.modalities],
    ];
    if ("patient_name" in study) fields.splice(1, 0, ["Patient", study.patient_name], ["Patient ID", study.patient_id]);
    const list = [];
    for (const [label, value] of fields) {
      list.push(el("dt", label));
      const dd = el("dd");
      if (value instanceof Node) dd.appendChild(value);
      else dd.textContent = fmtValue(value);
      list.push(dd);
    }
    $("study-fields").replaceChildren(...list);
    $("reprocess").onclick = () => {
      // The one action that starts new work for every route of the study: asked twice.
      if (window.confirm(`Run every route of study ${uid} again?`)) {
        act($("reprocess"), `studies/${encodeURIComponent(uid)}/reprocess`, "Reprocess study");
      }
    };

    fillTable(
      $("series-table"),
      [
        col("Number", "number", "num"),
        col("Description", "description"),
        col("Modality", "modality"),
        col("Instances", "instances", "num"),
        col("Route", "route"),
        col("Why", "route_reason", "reason"),
        col("Series Instance UID", (s) => uidCell(s.series_instance_uid), "uidcol"),
      ],
      study.series || [],
      "no series"
    );

    const jobColumns = [
      col("Job", "id", "num"),
      col("Route", "route"),
      col("Pipeline", "pipeline"),
      col("State", (j) => badge(j.state)),
      col("Reason", "reason", "reason"),
      col("Attempts", "attempts", "num"),
      col("Priority", "priority", "num"),
      col("Selection", "selection", "reason"),
      col("Created", (j) => timeCell(j.created_at)),
      col("Started", (j) => timeCell(j.started_at)),
      col("Finished", (j) => timeCell(j.finished_at)),
      col("Model s", "model_s", "num"),
      col("Total s", "total_s", "num"),
    ];
    if (isAdmin()) {
      jobColumns.push(
        col("", (j) => {
          const cell = el("span", null, "buttons");
          if (j.state === "queued") cell.appendChild(actionButton("Cancel", `jobs/${j.id}/cancel`, `Cancel job ${j.id}`));
          else if (j.state !== "running") cell.appendChild(actionButton("Retry", `jobs/${j.id}/retry`, `Retry job ${j.id}`));
          return cell;
        })
      );
    }
    const jobs = study.jobs || [];
    jobs.onRow = (row, job) => {
      row.dataset.job = String(job.id);
      row.classList.add("row-" + job.state);
    };
    fillTable($("jobs-table"), jobColumns, jobs, "no job (yet)");

    fillTable(
      $("results-table"),
      [
        col("Result", "id", "num"),
        col("Job", "job_id", "num"),
        col("Kind", "kind"),
        col("Series number", "series_number", "num"),
        col("Series Instance UID", (r) => uidCell(r.series_instance_uid), "uidcol"),
        col("SOP Instance UID", (r) => uidCell(r.sop_instance_uid), "uidcol"),
      ],
      study.results || [],
      "no result"
    );

    const deliveryColumns = [
      col("Delivery", "id", "num"),
      col("Job", "job_id", "num"),
      col("Kind", "kind"),
      col("Destination", "destination"),
      col("Peer", "peer"),
      col("State", (d) => badge(d.state)),
      col("Attempts", "attempts", "num"),
      col("Next attempt", (d) => timeCell(d.next_attempt_at)),
      col("Last error", "last_error", "reason"),
      col("Delivered", (d) => timeCell(d.delivered_at)),
      col("SOP Instance UID", (d) => uidCell(d.sop_instance_uid), "uidcol"),
    ];
    if (isAdmin()) {
      deliveryColumns.push(
        col("", (d) =>
          d.state === "delivered"
            ? el("span")
            : actionButton("Retry", `deliveries/${d.id}/retry`, `Retry delivery ${d.id}`)
        )
      );
    }
    const deliveries = study.deliveries || [];
    deliveries.onRow = (row, delivery) => {
      row.dataset.delivery = String(delivery.id);
      row.classList.add("row-" + delivery.state);
    };
    fillTable($("deliveries-table"), deliveryColumns, deliveries, "nothing to deliver (yet)");
  }

  const LABELS = {
    ae_title: "AE title",
    tls: "TLS",
    sha256: "SHA-256",
    stable_after_s: "Stable after (s)",
  };

  // A table of whatever fields the items have, the preferred ones first.
  function genericColumns(rows, preferred) {
    const keys = [];
    for (const key of preferred) if (rows.some((r) => key in r)) keys.push(key);
    for (const row of rows) for (const key of Object.keys(row)) if (!keys.includes(key)) keys.push(key);
    return keys.map((key) => {
      const label = LABELS[key] || key.charAt(0).toUpperCase() + key.slice(1).replace(/_/g, " ");
      return key.endsWith("_at") ? col(label, (r) => timeCell(r[key])) : col(label, key);
    });
  }

  async function renderModels() {
    const rows = items(await api("models"));
    fillTable($("models-table"), genericColumns(rows, ["name", "version", "task", "sha256"]), rows, "no model");
  }

  async function renderRoutes() {
    const rows = items(await api("routes"));
    const preferred = ["name", "match", "pipeline", "destinations", "priority", "stable_after_s"];
    fillTable($("routes-table"), genericColumns(rows, preferred), rows, "no route");
  }

  async function renderPeers() {
    const rows = items(await api("peers"));
    const columns = genericColumns(rows, ["name", "ae_title", "host", "port", "outputs", "tls"]);
    if (isAdmin()) {
      columns.push(
        col("C-ECHO", (peer) => {
          const cell = el("span", null, "buttons");
          const button = actionButton("Echo", `peers/${encodeURIComponent(peer.name)}/echo`, `C-ECHO ${peer.name}`);
          cell.appendChild(button);
          return cell;
        })
      );
    }
    rows.onRow = (row, peer) => {
      row.dataset.peer = String(peer.name);
    };
    fillTable($("peers-table"), columns, rows, "no peer");
  }

  async function renderAudit() {
    const rows = items(await api("audit"));
    fillTable(
      $("audit-table"),
      [
        col("At", (a) => timeCell(a.at)),
        col("Kind", "kind"),
        col("Actor", "actor"),
        col("Subject", "subject"),
        col("Detail", "detail", "reason"),
      ],
      rows,
      "no audit event"
    );
  }

  async function renderAssociations() {
    const rows = items(await api($("rejected-only").checked ? "associations?outcome=rejected" : "associations"));
    fillTable(
      $("associations-table"),
      [
        col("Started", (a) => timeCell(a.started_at)),
        col("Calling AE", "calling_ae"),
        col("Called AE", "called_ae"),
        col("Host", "host"),
        col("Outcome", (a) => badge(a.outcome)),
        col("Reason", "reason", "reason"),
      ],
      rows,
      $("rejected-only").checked ? "no rejected association" : "no association"
    );
  }

  // -- start -----------------------------------------------------------------------------------
  function start() {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token").value.trim();
      if (token) signIn(token);
    });
    $("logout").addEventListener("click", () => askForToken("Signed out."));
    window.addEventListener("hashchange", () => {
      $("message").hidden = true; // an action's outcome belongs to the view it was done in
      show();
    });
    for (const id of ["since", "state"]) {
      $(id).addEventListener("change", () => {
        state.offset = 0;
        refresh();
      });
    }
    $("study-filter").addEventListener("submit", (event) => event.preventDefault());
    $("rejected-only").addEventListener("change", refresh);
    $("prev-page").addEventListener("click", () => {
      state.offset = Math.max(0, state.offset - PAGE_SIZE);
      refresh();
    });
    $("next-page").addEventListener("click", () => {
      state.offset += PAGE_SIZE;
      refresh();
    });
    state.timer = setInterval(refresh, REFRESH_MS);
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) signIn(token);
    else askForToken("");
  }

  document.addEventListener("DOMContentLoaded", start);
})();
