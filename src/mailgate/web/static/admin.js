// mailgate admin: show only the fields that belong to the chosen kind, auth method and grant.
// Each element with data-when="path=a|b;other=c" is shown when every named field has one of
// the values; the inputs of hidden parts are disabled, so they are not sent. Without this
// script the server does the same on the next save.
(function () {
  "use strict";
  function valueOf(form, path) {
    var el = form.elements.namedItem(path);
    if (!el) return "";
    if (el.type === "checkbox") return el.checked ? "on" : "";
    return el.value;
  }
  function update(form) {
    form.querySelectorAll("[data-when]").forEach(function (part) {
      var shown = part.getAttribute("data-when").split(";").every(function (cond) {
        var i = cond.indexOf("=");
        return cond.slice(i + 1).split("|").indexOf(valueOf(form, cond.slice(0, i))) >= 0;
      });
      part.hidden = !shown;
    });
    form.querySelectorAll("input, select, textarea").forEach(function (input) {
      input.disabled = !!input.closest("[hidden]");
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("form.server-form").forEach(function (form) {
      form.addEventListener("change", function () { update(form); });
      update(form);
    });
  });
})();

// A stored secret is never sent to a changed destination: when the host, port, security, method
// or client changes, say at once that the secret must be given again (the save would say so too).
(function () {
  "use strict";
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("form.server-form").forEach(function (form) {
      var initial = {};
      form.querySelectorAll("[data-destination]").forEach(function (el) { initial[el.name] = el.value; });
      form.addEventListener("input", function () {
        var changed = Object.keys(initial).some(function (name) {
          var el = form.elements.namedItem(name);
          return el && el.value !== initial[name];
        });
        form.querySelectorAll("p.again").forEach(function (note) { note.hidden = !changed; });
      });
    });
  });
})();
