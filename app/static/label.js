// The labeling page's keyboard, drag-and-drop ranking, lease heartbeat and instant next task.
// The page works without this file: plain forms posted to the server (a rank select per item).
//
// Keys, pairwise:  1 / ←  A is better · 2 / →  B is better · 3 tie · 4 both bad
//                  q / w / e  slightly / clearly / much better (again: not said) · Enter submits
// Keys, ranking:   ↑ / ↓ focus the previous / next answer · 1-9 give the focused answer that rank
//                  0 clears it · Alt (or Shift) + ↑ / ↓ move it · t tie it with the one above
//                  (again: untie) · n none is acceptable · Enter submits
// Submitting posts with fetch; the server answers with the next task's HTML block in the same
// response, which replaces #label-root without a page load.
(() => {
  "use strict";
  let state = null; // the task on screen: {form, mode, shownAt, submitting, timer, rank}

  const csrf = () => {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  };

  function notify(message) {
    const notice = document.getElementById("lease-notice");
    if (!notice) return;
    notice.textContent = message;
    notice.hidden = !message;
  }

  // --- pairwise ------------------------------------------------------------------------------

  const PAIR_KEYS = { 1: "1", 2: "2", 3: "3", 4: "4", ArrowLeft: "1", ArrowRight: "2" };
  const STRENGTH_KEYS = { q: "q", w: "w", e: "e" };

  function highlight() {
    const form = state.form;
    form.querySelectorAll(".completion").forEach((el) => el.classList.remove("selected"));
    const checked = form.querySelector('input[name="choice"]:checked');
    const target = checked && checked.dataset.target && document.getElementById(checked.dataset.target);
    if (target) target.classList.add("selected");
  }

  function pairKey(event) {
    if (event.altKey) return;
    const key = event.key.toLowerCase();
    if (STRENGTH_KEYS[key]) {
      const input = state.form.querySelector(`input[name="strength"][data-key="${key}"]`);
      if (!input) return;
      event.preventDefault();
      if (input.checked) {
        state.form.querySelector('input[name="strength"][value=""]').checked = true;
      } else {
        input.checked = true;
      }
      return;
    }
    const choice = PAIR_KEYS[event.key];
    const input = choice && state.form.querySelector(`input[name="choice"][data-key="${choice}"]`);
    if (!input) return;
    event.preventDefault();
    input.checked = true;
    input.focus({ preventScroll: true });
    highlight();
  }

  function syncScroll(root) {
    const panes = Array.from(root.querySelectorAll("[data-sync-scroll] .completion"));
    if (panes.length !== 2) return;
    let driver = null; // the pane the person scrolls; the other follows, never echoing back
    panes.forEach((pane, i) => {
      const other = panes[1 - i];
      pane.addEventListener("scroll", () => {
        if (driver && driver !== pane) return;
        driver = pane;
        const range = pane.scrollHeight - pane.clientHeight;
        const ratio = range > 0 ? pane.scrollTop / range : 0;
        other.scrollTop = ratio * (other.scrollHeight - other.clientHeight);
        clearTimeout(pane._release);
        pane._release = setTimeout(() => { driver = null; }, 120);
      }, { passive: true });
    });
  }

  // --- ranking -------------------------------------------------------------------------------

  function setupRanking(st) {
    const list = st.form.querySelector("#ranking-list");
    const items = Array.from(list.querySelectorAll(".rank-item"));
    const rank = new Map(); // completion id -> rank number, or null while unranked
    items.forEach((li) => {
      const sel = li.querySelector("select");
      sel.tabIndex = -1; // keyboard focus lives on the item; the select is for the mouse
      const value = sel.value ? Number(sel.value.split(":")[1]) : null;
      rank.set(li.dataset.completionId, value);
      sel.addEventListener("change", () => {
        rank.set(li.dataset.completionId, sel.value ? Number(sel.value.split(":")[1]) : null);
        renderRanking(li);
      });
      li.addEventListener("dragstart", (e) => {
        st.dragged = li;
        li.classList.add("dragging");
        e.dataTransfer.effectAllowed = "move";
        e.dataTransfer.setData("text/plain", li.dataset.completionId);
      });
      li.addEventListener("dragend", () => {
        li.classList.remove("dragging");
        clearDropMarks(list);
        st.dragged = null;
      });
    });
    list.addEventListener("dragover", (e) => {
      const target = e.target instanceof Element && e.target.closest(".rank-item");
      if (!st.dragged || !target) return;
      e.preventDefault();
      clearDropMarks(list);
      if (target !== st.dragged) target.classList.add(dropBefore(target, e) ? "drop-before" : "drop-after");
    });
    list.addEventListener("drop", (e) => {
      const target = e.target instanceof Element && e.target.closest(".rank-item");
      if (!st.dragged || !target) return;
      e.preventDefault();
      const moved = st.dragged;
      clearDropMarks(list);
      if (target !== moved) placeNextTo(moved.dataset.completionId, target.dataset.completionId, dropBefore(target, e));
      renderRanking(moved);
    });
    st.rank = { list, items, values: rank, k: items.length };
    renderRanking(null);
  }

  function dropBefore(target, event) {
    const box = target.getBoundingClientRect();
    return event.clientY < box.top + box.height / 2;
  }

  function clearDropMarks(list) {
    list.querySelectorAll(".drop-before, .drop-after").forEach((el) => el.classList.remove("drop-before", "drop-after"));
  }

  // Items in screen order: by rank, unranked last, ties and unranked in display order.
  function ordered() {
    const { items, values } = state.rank;
    const key = (li) => values.get(li.dataset.completionId) ?? Infinity;
    return items.slice().sort((a, b) => key(a) - key(b) || a.dataset.index - b.dataset.index);
  }

  // Tie groups of completion ids, best first; unranked items first get ranks below the rest.
  function groups() {
    const { values } = state.rank;
    let top = Math.max(0, ...Array.from(values.values()).filter((v) => v !== null));
    const out = [];
    let last = null;
    for (const li of ordered()) {
      const id = li.dataset.completionId;
      if (values.get(id) === null) values.set(id, ++top);
      const r = values.get(id);
      if (r === last) out[out.length - 1].push(id);
      else out.push([id]);
      last = r;
    }
    return out;
  }

  function setGroups(gs) {
    const { values } = state.rank;
    gs.filter((g) => g.length).forEach((g, i) => g.forEach((id) => values.set(id, i + 1)));
  }

  function groupIndex(gs, id) {
    return gs.findIndex((g) => g.includes(id));
  }

  function moveItem(id, direction) {
    const gs = groups();
    const gi = groupIndex(gs, id);
    if (gs[gi].length > 1) { // leaving a tie: become its own group just above / below it
      gs[gi] = gs[gi].filter((x) => x !== id);
      gs.splice(direction < 0 ? gi : gi + 1, 0, [id]);
    } else {
      const to = gi + direction;
      if (to < 0 || to >= gs.length) return;
      [gs[gi], gs[to]] = [gs[to], gs[gi]];
    }
    setGroups(gs);
  }

  function placeNextTo(id, targetId, before) {
    const gs = groups().map((g) => g.filter((x) => x !== id)).filter((g) => g.length);
    const ti = groupIndex(gs, targetId);
    gs.splice(before ? ti : ti + 1, 0, [id]);
    setGroups(gs);
  }

  function toggleTie(id) {
    const order = ordered();
    const pos = order.findIndex((li) => li.dataset.completionId === id);
    if (pos <= 0) return;
    const above = order[pos - 1].dataset.completionId;
    const gs = groups();
    const gi = groupIndex(gs, id);
    if (gs[gi].includes(above)) { // untie: own group right below the tie
      gs[gi] = gs[gi].filter((x) => x !== id);
      gs.splice(gi + 1, 0, [id]);
    } else {
      gs[gi] = gs[gi].filter((x) => x !== id);
      gs[groupIndex(gs, above)].push(id);
    }
    setGroups(gs);
  }

  function renderRanking(focusItem) {
    const { list, values } = state.rank;
    let previous;
    ordered().forEach((li) => {
      const id = li.dataset.completionId;
      const r = values.get(id);
      list.appendChild(li);
      li.querySelector("select").value = r === null ? "" : `${id}:${r}`;
      li.classList.toggle("tied", r !== null && r === previous);
      li.classList.toggle("unranked", r === null);
      li.setAttribute("aria-label", `Answer ${li.querySelector(".item-label").textContent}, ` +
        (r === null ? "no rank yet" : `rank ${r}`));
      previous = r;
    });
    if (focusItem) focusItem.focus();
  }

  function focusedItem() {
    const el = document.activeElement;
    return el instanceof Element ? el.closest(".rank-item") : null;
  }

  function rankingKey(event) {
    const { values, k } = state.rank;
    const order = ordered();
    let li = focusedItem();
    const key = event.key;
    if (key === "ArrowUp" || key === "ArrowDown") {
      event.preventDefault();
      const step = key === "ArrowUp" ? -1 : 1;
      if (!li) { order[0].focus(); return; }
      if (event.altKey || event.shiftKey) {
        moveItem(li.dataset.completionId, step);
        renderRanking(li);
      } else {
        const pos = order.indexOf(li) + step;
        if (pos >= 0 && pos < order.length) order[pos].focus();
      }
      return;
    }
    if (event.altKey) return;
    if (/^[0-9]$/.test(key) && Number(key) <= k) {
      event.preventDefault();
      li = li || order[0];
      values.set(li.dataset.completionId, key === "0" ? null : Number(key));
      renderRanking(li);
      return;
    }
    if (key === "t" || key === "T") {
      if (!li) return;
      event.preventDefault();
      toggleTie(li.dataset.completionId);
      renderRanking(li);
      return;
    }
    if (key === "n" || key === "N") {
      const box = state.form.querySelector('input[name="none_acceptable"]');
      if (box) { event.preventDefault(); box.checked = !box.checked; }
    }
  }

  // --- submit, skip and the swap to the next task ----------------------------------------------

  function complete() {
    if (state.mode === "ranking") {
      const missing = ordered().find((li) => state.rank.values.get(li.dataset.completionId) === null);
      if (missing) {
        notify("Give every answer a rank first (equal ranks are ties).");
        missing.focus();
        return false;
      }
      return true;
    }
    if (!state.form.querySelector('input[name="choice"]:checked')) {
      state.form.reportValidity();
      return false;
    }
    return true;
  }

  async function post(url, body) {
    const resp = await fetch(url, {
      method: "POST",
      body,
      credentials: "same-origin",
      headers: { "HX-Request": "true", "X-CSRF-Token": csrf(), Accept: "text/html, application/json;q=0.9" },
    });
    if (resp.ok) {
      swap(await resp.text());
      return;
    }
    let detail = `The server said ${resp.status}.`;
    try { detail = (await resp.json()).detail || detail; } catch (_err) { /* not JSON */ }
    if (resp.status === 409) {
      notify(detail + " Loading the next task…");
      setTimeout(loadNext, 1500);
      return;
    }
    throw new Error(detail);
  }

  async function loadNext() {
    const projectId = state && state.form.dataset.projectId;
    const path = projectId ? `/label/${projectId}` : location.pathname;
    const resp = await fetch(path, { credentials: "same-origin", headers: { "HX-Request": "true" } });
    if (resp.ok) swap(await resp.text());
    else location.reload();
  }

  function swap(html) {
    const fresh = new DOMParser().parseFromString(html, "text/html").getElementById("label-root");
    const old = document.getElementById("label-root");
    if (!fresh || !old) { location.reload(); return; }
    old.replaceWith(document.adoptNode(fresh));
    window.scrollTo(0, 0);
    setup();
  }

  async function submit() {
    if (!state || state.submitting || !complete()) return;
    state.submitting = true; // a second Enter must not post again (the server would ignore it)
    const form = state.form;
    form.elements.time_spent_ms.value = String(Math.round(performance.now() - state.shownAt));
    try {
      await post(form.action, new FormData(form));
    } catch (err) {
      state.submitting = false;
      notify(`Not saved: ${err.message || "the server could not be reached"}. Press Enter to try again.`);
    }
  }

  async function skip(event) {
    event.preventDefault();
    if (!state || state.submitting) return;
    state.submitting = true;
    try {
      await post(event.target.action, new FormData(event.target));
    } catch (err) {
      state.submitting = false;
      notify(`Not skipped: ${err.message || "the server could not be reached"}.`);
    }
  }

  function heartbeat(st) {
    const everyS = Number(st.form.dataset.heartbeatS) || 60;
    const taskId = st.form.dataset.taskId;
    st.timer = setInterval(async () => {
      try {
        const resp = await fetch(`/api/v1/tasks/${taskId}/heartbeat`, {
          method: "POST",
          credentials: "same-origin",
          headers: { "X-CSRF-Token": csrf(), Accept: "application/json" },
        });
        if (resp.status === 409 || resp.status === 404) {
          clearInterval(st.timer);
          if (st === state) {
            notify("Your reservation of this task ran out and someone else took it. Loading the next task…");
            setTimeout(loadNext, 1500);
          }
        }
      } catch (_err) {
        // Offline for a moment: the next beat tries again; the judgment is accepted while needed.
      }
    }, everyS * 1000);
  }

  function setup() {
    if (state && state.timer) clearInterval(state.timer);
    state = null;
    const form = document.getElementById("label-form");
    if (!form) return;
    state = { form, mode: form.dataset.mode, shownAt: performance.now(), submitting: false, timer: null };
    form.addEventListener("submit", (event) => { event.preventDefault(); submit(); });
    form.addEventListener("change", () => { if (state.mode === "pair") highlight(); });
    const skipForm = document.getElementById("skip-form");
    if (skipForm) skipForm.addEventListener("submit", skip);
    if (state.mode === "ranking") {
      setupRanking(state);
    } else {
      syncScroll(document.getElementById("label-root"));
    }
    heartbeat(state);
  }

  document.addEventListener("keydown", (event) => {
    if (!state || event.isComposing) return;
    const t = event.target;
    const typing = t instanceof HTMLTextAreaElement ||
      (t instanceof HTMLInputElement && !["radio", "checkbox"].includes(t.type));
    if (event.key === "Enter") {
      const onControl = t instanceof Element && t.closest("button, a, summary");
      if (onControl) return; // Enter on Skip, Log out or a link does what it says
      if (typing && !(event.ctrlKey || event.metaKey)) return; // a newline in the rationale
      event.preventDefault();
      submit();
      return;
    }
    if (typing || event.ctrlKey || event.metaKey || t instanceof HTMLSelectElement) return;
    if (state.mode === "ranking") rankingKey(event);
    else pairKey(event);
  });

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", setup);
  else setup();
})();
