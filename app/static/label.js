// Keyboard shortcuts and the lease heartbeat for the labeling page.
// The page works without this file: it is a plain form posted to the server.
(() => {
  "use strict";
  const form = document.getElementById("label-form");
  if (!form) return;

  const KEYS = { "1": "1", "2": "2", "3": "3", "4": "4", ArrowLeft: "1", ArrowRight: "2" };
  let submitting = false;

  function radio(key) {
    return form.querySelector(`input[name="choice"][data-key="${key}"]`);
  }

  function highlight() {
    form.querySelectorAll(".completion").forEach((el) => el.classList.remove("selected"));
    const checked = form.querySelector('input[name="choice"]:checked');
    const target = checked && checked.dataset.target && document.getElementById(checked.dataset.target);
    if (target) target.classList.add("selected");
  }

  function submit() {
    if (submitting) return;
    if (!form.querySelector('input[name="choice"]:checked')) {
      form.reportValidity();
      return;
    }
    submitting = true;  // a second Enter must not post again (the server would ignore it anyway)
    form.requestSubmit();
  }

  form.addEventListener("change", highlight);
  form.addEventListener("submit", () => { submitting = true; });

  document.addEventListener("keydown", (event) => {
    if (event.altKey || event.isComposing) return;
    const inText = event.target instanceof HTMLTextAreaElement ||
      (event.target instanceof HTMLInputElement && !["radio", "checkbox"].includes(event.target.type));
    if (event.key === "Enter") {
      const onControl = event.target instanceof Element && event.target.closest("button, a, summary");
      if (onControl) return;  // Enter on Skip, Log out or a link does what it says
      if (inText && !(event.ctrlKey || event.metaKey)) return;  // a newline in the rationale
      event.preventDefault();
      submit();
      return;
    }
    if (inText || event.ctrlKey || event.metaKey) return;
    const key = KEYS[event.key];
    const input = key && radio(key);
    if (!input) return;
    event.preventDefault();
    input.checked = true;
    input.focus({ preventScroll: true });
    highlight();
  });

  // Keep the lease alive while the page is open.
  const taskId = form.dataset.taskId;
  const everyS = Number(form.dataset.heartbeatS) || 60;
  const meta = document.querySelector('meta[name="csrf-token"]');
  const notice = document.getElementById("lease-notice");
  const timer = setInterval(async () => {
    try {
      const resp = await fetch(`/api/v1/tasks/${taskId}/heartbeat`, {
        method: "POST",
        credentials: "same-origin",
        headers: { "X-CSRF-Token": meta ? meta.content : "", Accept: "application/json" },
      });
      if (resp.status === 409 || resp.status === 404) {
        clearInterval(timer);
        if (notice) {
          notice.textContent = "Your reservation of this task ran out and someone else took it. " +
            "Reload for the next task.";
          notice.hidden = false;
        }
      }
    } catch (_err) {
      // Offline for a moment: the next beat tries again; the judgment is accepted while needed.
    }
  }, everyS * 1000);
})();
