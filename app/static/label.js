// The labeling page's keyboard, drag-and-drop ranking, lease heartbeat and instant next task.
// The page works without this file: plain forms posted to the server (a rank select per item).
//
// Keys, pairwise:  1 / ←  A is better · 2 / →  B is better · 3 tie · 4 both bad
//                  q / w / e  slightly / clearly / much better (again: not said) · Enter submits
// Keys, ranking:   ↑ / ↓ focus the previous / next answer · 1-9 give the focused answer that rank
//                  0 clears it · Alt (or Shift) + ↑ / ↓ move it · t tie it with the one above
//                  (again: untie) · n none is acceptable · Enter submits. Only answers the
//                  annotator ranked or moved have a rank (see "ranking" below).
// The script marks <html> with the class "js": label.css shows the shortcut hints only then.
// Submitting posts with fetch; the server answers with the next task's HTML block in the same
// response, which replaces #label-root without a page load.
(() => {
  "use strict";
  document.documentElement.classList.add("js");
  let state = null; // the task on screen: {form, mode, shownAt, submitting, timer, rank}

  const csrf = () => {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  };

  // A server's detail ends without a full stop; give it one before another sentence follows.
  function sentence(text) {
    const t = String(text).trim();
    return /[.!?…]$/.test(t) ? t : `${t}.`;
  }

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
  //
  // The state is each answer's rank (null until the annotator gives it one) and the screen
  // order: ranked answers best first, the unranked ones below them in display order. Only what
  // the annotator does to an answer gives it a rank, so "Give every answer a rank" still guards
  // the submit:
  //   1-9, the select   that rank; the answer goes last among those already at that rank (0: none)
  //   t                 joins the tie of the answer directly above (which needs a rank) and stays
  //                     below it; pressed again it leaves the tie for its own rank right below
  //   Alt/Shift + ↑/↓   a ranked answer swaps with the group above / below, or steps out of its
  //                     tie; an unranked answer joins the ranking at its bottom
  //   drag              the dropped answer gets its own rank where it was dropped among the
  //                     ranked answers (dropped on an unranked one: below all ranked ones)
  // t, moves and drags renumber the ranks 1, 2, 3 … without gaps; typed ranks are kept as typed.

  const rankOf = (select) => (select.value ? Number(select.value.split(":")[1]) : null);

  function setupRanking(st) {
    const list = st.form.querySelector("#ranking-list");
    const items = Array.from(list.querySelectorAll(".rank-item"));
    const values = new Map(); // completion id -> rank number, or null while unranked
    st.form.noValidate = true; // complete() checks the ranks and says which answers lack one
    items.forEach((li) => {
      const sel = li.querySelector("select");
      sel.tabIndex = -1; // keyboard focus lives on the item; the select is for the mouse
      values.set(li.dataset.completionId, rankOf(sel)); // a reload may restore the selects
      sel.addEventListener("change", () => {
        setRank(li.dataset.completionId, rankOf(sel));
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
    st.rank = {
      list,
      byId: new Map(items.map((li) => [li.dataset.completionId, li])),
      values,
      order: items.map((li) => li.dataset.completionId), // screen order, top first
      k: items.length,
      notice: st.form.querySelector("#rank-notice"),
    };
    sortOrder(null);
    renderRanking(null);
  }

  function dropBefore(target, event) {
    const box = target.getBoundingClientRect();
    return event.clientY < box.top + box.height / 2;
  }

  function clearDropMarks(list) {
    list.querySelectorAll(".drop-before, .drop-after").forEach((el) => el.classList.remove("drop-before", "drop-after"));
  }

  const labelOf = (id) => state.rank.byId.get(id).querySelector(".item-label").textContent;

  // Sorts the screen order by rank, unranked last in display order. Answers at the same rank
  // keep their order, except `joined` (just given its rank), which goes last among them.
  function sortOrder(joined) {
    const { order, values, byId, k } = state.rank;
    const pos = new Map(order.map((id, i) => [id, i]));
    const key = (id) => values.get(id) === null
      ? [k + 1, Number(byId.get(id).dataset.index)]
      : [values.get(id), id === joined ? order.length : pos.get(id)];
    order.sort((a, b) => {
      const [x, y] = [key(a), key(b)];
      return x[0] - y[0] || x[1] - y[1];
    });
  }

  function setRank(id, rank) {
    const { values } = state.rank;
    if (values.get(id) === rank) return;
    values.set(id, rank);
    sortOrder(id);
  }

  // Tie groups of the ranked answers' ids, best first, each in screen order.
  function groups() {
    const { order, values } = state.rank;
    const out = [];
    let last = null;
    for (const id of order) {
      const r = values.get(id);
      if (r === null) break; // the unranked follow the ranked
      if (r === last) out[out.length - 1].push(id);
      else out.push([id]);
      last = r;
    }
    return out;
  }

  // Ranks the answers in `gs` 1, 2, 3 … in that order; every other answer stays unranked.
  function setGroups(gs) {
    const { values } = state.rank;
    const ranked = gs.filter((g) => g.length);
    ranked.forEach((g, i) => g.forEach((id) => values.set(id, i + 1)));
    const placed = new Set(ranked.flat());
    state.rank.order = ranked.flat().concat(state.rank.order.filter((id) => !placed.has(id)));
  }

  function groupIndex(gs, id) {
    return gs.findIndex((g) => g.includes(id));
  }

  function without(gs, id) {
    return gs.map((g) => g.filter((x) => x !== id)).filter((g) => g.length);
  }

  function moveItem(id, direction) {
    const gs = groups();
    const gi = groupIndex(gs, id);
    if (gi < 0) { // unranked: it joins the ranking at the bottom
      gs.push([id]);
    } else if (gs[gi].length > 1) { // leaving a tie: its own group just above / below it
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
    const gs = without(groups(), id);
    const ti = groupIndex(gs, targetId);
    if (ti < 0) gs.push([id]); // dropped among the unranked: below the ranked ones
    else gs.splice(before ? ti : ti + 1, 0, [id]);
    setGroups(gs);
  }

  // Ties `id` with the answer directly above it, or unties it when it already is; returns why
  // nothing changed, or "".
  function toggleTie(id) {
    const { order, values } = state.rank;
    const pos = order.indexOf(id);
    if (pos === 0) return "The top answer has nothing above it to tie with.";
    const above = order[pos - 1];
    if (values.get(above) === null) return `Give answer ${labelOf(above)} a rank first; T then ties ${labelOf(id)} with it.`;
    let gs = groups();
    const gi = groupIndex(gs, id);
    if (gi >= 0 && gs[gi].includes(above)) { // untie: its own rank right below the tie
      gs[gi] = gs[gi].filter((x) => x !== id);
      gs.splice(gi + 1, 0, [id]);
    } else { // tie: last in the group of the one above, so it stays right below that one
      gs = without(gs, id);
      gs[groupIndex(gs, above)].push(id);
    }
    setGroups(gs);
    return "";
  }

  // Puts the items in screen order and shows their ranks, ties and (after a refused submit)
  // which still need a rank; `why` is a note for the annotator, shown until the next change.
  function renderRanking(focusItem, why = "") {
    const { list, values, byId, order } = state.rank;
    let previous = null;
    order.forEach((id, i) => {
      const li = byId.get(id);
      const r = values.get(id);
      const tied = r !== null && r === previous;
      if (list.children[i] !== li) list.insertBefore(li, list.children[i]);
      li.querySelector("select").value = r === null ? "" : `${id}:${r}`;
      li.classList.toggle("tied", tied);
      li.classList.toggle("unranked", r === null);
      li.classList.toggle("missing", Boolean(state.rank.flagged) && r === null);
      li.setAttribute("aria-label", `Answer ${labelOf(id)}, ` +
        (r === null ? "no rank yet" : `rank ${r}${tied ? ", tied with the one above" : ""}`));
      previous = r;
    });
    const missing = order.filter((id) => values.get(id) === null);
    if (!missing.length) state.rank.flagged = false;
    const message = why || (state.rank.flagged
      ? `Give every answer a rank first (equal ranks are ties); ${missing.map(labelOf).join(", ")} ` +
        `${missing.length === 1 ? "has" : "have"} none yet.`
      : "");
    const { notice } = state.rank;
    if (notice && notice.textContent !== message) notice.textContent = message;
    if (focusItem && document.activeElement !== focusItem) focusItem.focus();
  }

  function focusedItem() {
    const el = document.activeElement;
    return el instanceof Element ? el.closest(".rank-item") : null;
  }

  function rankingKey(event) {
    const { byId, k } = state.rank;
    const order = state.rank.order;
    let li = focusedItem();
    const key = event.key;
    if (key === "ArrowUp" || key === "ArrowDown") {
      event.preventDefault();
      const step = key === "ArrowUp" ? -1 : 1;
      if (!li) { byId.get(order[0]).focus(); return; }
      if (event.altKey || event.shiftKey) {
        moveItem(li.dataset.completionId, step);
        renderRanking(li);
      } else {
        const pos = order.indexOf(li.dataset.completionId) + step;
        if (pos >= 0 && pos < order.length) byId.get(order[pos]).focus();
      }
      return;
    }
    if (event.altKey) return;
    if (/^[0-9]$/.test(key) && Number(key) <= k) {
      event.preventDefault();
      li = li || byId.get(order[0]);
      setRank(li.dataset.completionId, key === "0" ? null : Number(key));
      renderRanking(li);
      return;
    }
    if (key === "t" || key === "T") {
      if (!li) return;
      event.preventDefault();
      renderRanking(li, toggleTie(li.dataset.completionId));
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
      const { order, values, byId } = state.rank;
      const missing = order.find((id) => values.get(id) === null);
      if (missing) { // mark every unranked answer, say so by the Submit button, go to the first
        state.rank.flagged = true;
        renderRanking(byId.get(missing));
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
      const capital = detail.charAt(0).toUpperCase() + detail.slice(1);
      notify(`${sentence(capital)} Loading the next task…`);
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
      notify(`Not saved: ${sentence(err.message || "the server could not be reached")} Press Enter to try again.`);
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
      notify(`Not skipped: ${sentence(err.message || "the server could not be reached")}`);
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
