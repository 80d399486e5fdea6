// Buttons with data-post="<url>" POST to the admin API (with the page's CSRF token), then reload the page.
"use strict";

function flash(text, isError) {
  const box = document.getElementById("flash");
  box.textContent = text;
  box.className = isError ? "flash error" : "flash";
  box.hidden = false;
}

async function post(button) {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  button.disabled = true;
  try {
    const response = await fetch(button.dataset.post, {
      method: "POST",
      credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
      body: button.dataset.body || "{}",
    });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) {
      flash(answer.message || `${response.status} ${response.statusText}`, true);
      button.disabled = false;
      return;
    }
    flash("done: " + JSON.stringify(answer), false);
    window.location.reload();
  } catch (error) {
    flash(String(error), true);
    button.disabled = false;
  }
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-post]");
  if (button) {
    event.preventDefault();
    post(button);
  }
});
